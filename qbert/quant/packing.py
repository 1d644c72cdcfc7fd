"""The packed layout of low-bit weight codes: the single statement, for every bit width and backend.

Codes are unsigned, ``u in [0, 2**bits - 1]``, for ``bits in {2, 3, 4, 8}``; a weight is ``[N, K]``
(output channels x input features) and is packed along K into int32 words stored ``[K_words, N]``
(N contiguous), so that the threads of a GPU kernel that own neighbouring output channels read
neighbouring words (coalesced), and a CPU kernel vectorizes over N.

Chunks. K is cut into chunks of ``PACK_CHUNK = 32`` consecutive codes (the last chunk is zero-padded).
A chunk of b-bit codes takes exactly b words (32 * b bits), so 3-bit codes cost 3 bits, never 4:

    w_packed: int32 [ceil(K / 32) * bits, N];   chunk c of column n is rows c*bits .. c*bits + bits-1

Slices. The ``bits`` of a code are split into slices whose widths are the powers of two in ``bits``,
widest first, taking the code's bits from the lowest up:

    bits 8 -> [8]     bits 4 -> [4]     bits 3 -> [2 (code bits 0-1), 1 (code bit 2)]     bits 2 -> [2]

A slice of width w holds its w bits of the chunk's 32 codes in w consecutive words (slices in the order
above), 32 / w codes per word.

Inside a word ("byte-sliced"). Code j of the chunk (0 <= j < 32) sits in the slice's word ``j // (32/w)``,
at position ``r = j % (32/w)`` of that word, at bit ``8 * (r % 4) + w * (r // 4)``. So each byte of a
word holds codes r, r+4, r+8, ... and one shift and one mask,

    (word >> (w * i)) & BYTE_MASK[w]        BYTE_MASK[w] = ((1 << w) - 1) * 0x01010101

yield codes 4i .. 4i+3 of the word as four bytes: four consecutive K values in one 32-bit register,
which is the operand shape of the int8 tensor cores (mma m16n8k32 B fragments), of VNNI dot products
on the CPU, and of a byte-wise OR that rebuilds a 3-bit code from its 2-bit and 1-bit slices.

Worked example, bits = 4: a chunk is 4 words of 8 codes; word 0 holds codes 0-7 with code 0 in bits 0-3,
code 1 in bits 8-11, code 2 in bits 16-19, code 3 in bits 24-27, code 4 in bits 4-7, ..., code 7 in bits
28-31; ``word & 0x0F0F0F0F`` is codes 0-3 as bytes and ``(word >> 4) & 0x0F0F0F0F`` codes 4-7.

``pack`` and ``unpack`` below are the reference implementation of this layout (exact round trip).
"""

from __future__ import annotations

import torch

PACK_CHUNK = 32  # codes per chunk; a chunk of b-bit codes is b int32 words
WORD_BITS = 32
BYTES_PER_WORD = 4
BITS_CHOICES = (2, 3, 4, 8)


def slices(bits: int) -> tuple[tuple[int, int], ...]:
    """``((width, code bit offset), ...)`` of a b-bit code, widest slice first (3 -> ((2, 0), (1, 2)))."""
    check_bits("slices", bits)
    widths = [1 << p for p in reversed(range(bits.bit_length())) if bits & (1 << p)]
    offsets = [sum(widths[:i]) for i in range(len(widths))]
    return tuple(zip(widths, offsets))


def byte_mask(width: int) -> int:
    """``((1 << width) - 1)`` repeated in each byte of a word: extracts four codes of a slice at once."""
    return ((1 << width) - 1) * int.from_bytes(b"\x01" * BYTES_PER_WORD, "little")


def check_bits(op: str, bits: int) -> None:
    if bits not in BITS_CHOICES:
        raise ValueError(f"{op}: bits must be one of {BITS_CHOICES}, got {bits!r}")


def packed_rows(k: int, bits: int) -> int:
    """Rows of ``w_packed`` for K input features: ``ceil(K / 32) * bits``."""
    return -(-k // PACK_CHUNK) * bits


def _positions(width: int) -> torch.Tensor:
    """Bit position inside its word of each of the 32 / width codes a word holds."""
    r = torch.arange(WORD_BITS // width)
    return 8 * (r % BYTES_PER_WORD) + width * (r // BYTES_PER_WORD)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes ``[N, K]`` (uint8, each < 2**bits) into ``w_packed`` int32 ``[ceil(K/32)*bits, N]``."""
    check_bits("pack", bits)
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(f"pack: codes must be a uint8 [N, K] tensor, got {codes.dtype} of shape "
                         f"{list(codes.shape)}")
    if codes.numel() and int(codes.max()) >= 1 << bits:
        raise ValueError(f"pack: codes must be < 2**bits = {1 << bits}, got a code {int(codes.max())}")
    n, k = codes.shape
    chunks = -(-k // PACK_CHUNK)
    padded = torch.zeros(n, chunks * PACK_CHUNK, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes
    padded = padded.view(n, chunks, PACK_CHUNK)
    words = []
    for width, offset in slices(bits):
        part = (padded >> offset) & ((1 << width) - 1)  # [N, chunks, 32]
        part = part.view(n, chunks, width, WORD_BITS // width)
        shifts = _positions(width).to(codes.device)
        words.append((part << shifts).sum(-1))  # disjoint bits: the sum is an OR; [N, chunks, width]
    packed = torch.cat(words, dim=-1).reshape(n, chunks * bits)
    # Words are unsigned 32-bit patterns; store them as int32 with the same bits.
    packed = torch.where(packed >= 1 << (WORD_BITS - 1), packed - (1 << WORD_BITS), packed)
    return packed.to(torch.int32).T.contiguous()


def unpack(w_packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The uint8 codes ``[N, K]`` packed in ``w_packed`` int32 ``[ceil(K/32)*bits, N]`` (inverse of ``pack``)."""
    check_bits("unpack", bits)
    rows = packed_rows(k, bits)
    if w_packed.dtype != torch.int32 or w_packed.dim() != 2 or w_packed.shape[0] != rows:
        raise ValueError(f"unpack: w_packed must be int32 [ceil(K/32)*bits = {rows}, N] for K={k}, "
                         f"bits={bits}, got {w_packed.dtype} of shape {list(w_packed.shape)}")
    n = w_packed.shape[1]
    chunks = rows // bits
    words = w_packed.T.to(torch.int64).view(n, chunks, bits) & ((1 << WORD_BITS) - 1)
    codes = torch.zeros(n, chunks, PACK_CHUNK, dtype=torch.int64, device=w_packed.device)
    first_word = 0
    for width, offset in slices(bits):
        part = words[..., first_word:first_word + width, None]  # [N, chunks, width, 1]
        shifts = _positions(width).to(w_packed.device)
        values = (part >> shifts) & ((1 << width) - 1)  # [N, chunks, width, 32 / width]
        codes |= values.reshape(n, chunks, PACK_CHUNK) << offset
        first_word += width
    return codes.reshape(n, chunks * PACK_CHUNK)[:, :k].to(torch.uint8)
