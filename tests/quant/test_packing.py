import pytest
import torch

from qbert.quant.packing import BITS_CHOICES, PACK_CHUNK, byte_mask, pack, packed_rows, slices, unpack

SIZES = [(1, 1), (1, 32), (7, 13), (13, 33), (5, 64), (3, 129), (2, 257)]


def _codes(n, k, bits, seed=0):
    g = torch.Generator().manual_seed(seed + n * 131 + k)
    return torch.randint(0, 1 << bits, (n, k), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("bits", BITS_CHOICES)
@pytest.mark.parametrize("n,k", SIZES, ids=str)
def test_round_trip_exact(bits, n, k):
    # Tier: exact.
    codes = _codes(n, k, bits)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (packed_rows(k, bits), n)
    assert torch.equal(unpack(packed, bits, k), codes)


@pytest.mark.parametrize("bits", BITS_CHOICES)
def test_a_chunk_costs_exactly_bits_words(bits):
    # 32 codes of b bits take b words: 3-bit codes are not padded to 4 bits.
    assert pack(_codes(4, PACK_CHUNK, bits), bits).shape == (bits, 4)
    assert packed_rows(PACK_CHUNK * 24, bits) == 24 * bits


def test_slices():
    assert slices(8) == ((8, 0),)
    assert slices(4) == ((4, 0),)
    assert slices(3) == ((2, 0), (1, 2))
    assert slices(2) == ((2, 0),)


def test_documented_word_layout_4bit():
    # The worked example of the layout docstring: codes 0..7 of a chunk in word 0, code r at bit
    # 8 * (r % 4) + 4 * (r // 4); mask 0x0F0F0F0F gives codes 0-3 as bytes, after >> 4 codes 4-7.
    codes = torch.arange(PACK_CHUNK, dtype=torch.uint8)[None] % 16
    word = int(pack(codes, 4)[0, 0]) & 0xFFFFFFFF
    assert word == 0x73625140
    assert (word & byte_mask(4)).to_bytes(4, "little") == bytes([0, 1, 2, 3])
    assert ((word >> 4) & byte_mask(4)).to_bytes(4, "little") == bytes([4, 5, 6, 7])


@pytest.mark.parametrize("bits", BITS_CHOICES)
def test_shift_and_mask_yield_four_consecutive_codes(bits):
    # The property the kernels rely on: in every slice, (word >> (w * i)) & byte_mask(w) is four
    # consecutive codes' bits of that slice, one per byte.
    codes = _codes(1, PACK_CHUNK, bits, seed=3)[0].tolist()
    words = [int(v) & 0xFFFFFFFF for v in pack(torch.tensor([codes], dtype=torch.uint8), bits)[:, 0]]
    first = 0
    for width, offset in slices(bits):
        per_word = 32 // width
        for j0 in range(0, PACK_CHUNK, 4):
            word = words[first + j0 // per_word]
            i = (j0 % per_word) // 4
            got = list(((word >> (width * i)) & byte_mask(width)).to_bytes(4, "little"))
            assert got == [(c >> offset) & ((1 << width) - 1) for c in codes[j0:j0 + 4]]
        first += width


def test_three_bit_code_is_or_of_its_slices():
    codes = _codes(1, PACK_CHUNK, 3, seed=5)
    words = [int(v) & 0xFFFFFFFF for v in pack(codes, 3)[:, 0]]
    low = [(words[j // 16] >> (8 * (j % 16 % 4) + 2 * (j % 16 // 4))) & 3 for j in range(PACK_CHUNK)]
    high = [(words[2] >> (8 * (j % 4) + j // 4)) & 1 for j in range(PACK_CHUNK)]
    assert [lo | (hi << 2) for lo, hi in zip(low, high)] == codes[0].tolist()


@pytest.mark.parametrize("call,match", [
    (lambda: pack(torch.zeros(2, 3, dtype=torch.uint8), 5), r"bits must be one of \(2, 3, 4, 8\)"),
    (lambda: pack(torch.zeros(2, 3), 4), "codes must be a uint8"),
    (lambda: pack(torch.full((2, 3), 16, dtype=torch.uint8), 4), "codes must be < 2\\*\\*bits = 16"),
    (lambda: unpack(torch.zeros(3, 2, dtype=torch.int32), 4, 32), r"w_packed must be int32 \[ceil\(K/32\)"),
], ids=["bits", "dtype", "range", "rows"])
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
