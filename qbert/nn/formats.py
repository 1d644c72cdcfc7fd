"""Linear-layer formats: how a QLinear stores its weight and what it does with its activations.

A format is a small frozen descriptor. Named formats (the ``mode`` strings of ``QLinear`` and
``qbert.quantize``) follow the ``w<weight bits>a<activation bits>`` convention; ``a16`` means the
activations stay in floating point (float32, float16 or bfloat16), ``a8`` that they are quantized to int8
per token on the fly.

=========  ===================================================  =======================================
name       weight (default granularity)                         op
=========  ===================================================  =======================================
w8a8       int8 [N, K], symmetric, one float32 scale per row    ``w8a8_linear`` (int8 x int8 GEMM)
w8a16      int8 [N, K], symmetric, one float32 scale per row    ``w8a16_linear``
w4a16      packed 4-bit, asymmetric, K groups of 128            ``lowbit_linear``
w3a16      packed 3-bit, asymmetric, K groups of 128            ``lowbit_linear``
w2a16      packed 2-bit, asymmetric, K groups of 128            ``lowbit_linear``
w4a8       packed 4-bit, asymmetric, K groups of 128            ``w4a8_linear`` (codes widened to int8)
w3a8       packed 3-bit, asymmetric, K groups of 128            ``w4a8_linear``
w2a8       packed 2-bit, asymmetric, K groups of 128            ``w4a8_linear``
=========  ===================================================  =======================================

The packed formats take overrides (``linear_format("w4a16", group_size=64)``): ``group_size`` (a multiple
of 32, or -1 for one range per output channel), ``row_groups`` (Q-BERT's G groups of output rows sharing
one range), ``symmetric``. ``w8a16`` with an override becomes packed 8-bit codes on ``lowbit_linear``.
Codes, scales and zero points are stated in ``qbert.quant.lowbit``, the bit layout in
``qbert.quant.packing``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from qbert.quant.int8 import INT8_QMAX
from qbert.quant.lowbit import LowBitScheme
from qbert.quant.packing import packed_rows

_INT8_BITS = 8
_FLOAT32_BYTES = 4
_INT8_BYTES = 1
DEFAULT_GROUP_SIZE = 128
PER_CHANNEL = -1  # the group_size override meaning "one range per output channel" (GPTQ's convention)


@dataclass(frozen=True)
class LinearFormat:
    """One quantized linear-layer format.

    name: the mode it derives from (``"w4a16"``); ``describe()`` adds the overrides.
    weight_bits: bits per weight code.
    activation_bits: 8 for per-token int8 activations; None keeps them in floating point.
    symmetric: symmetric codes (implicit zero point); False stores one uint8 zero point per range.
    group_size: input features sharing a range (K groups); None: the whole row.
    row_groups: Q-BERT row groups; None: one range per output channel.
    """

    name: str
    weight_bits: int
    activation_bits: int | None
    symmetric: bool
    group_size: int | None = None
    row_groups: int | None = None

    def __post_init__(self) -> None:
        if self.packed:
            self.scheme  # noqa: B018 (validates bits, group_size and row_groups)

    @property
    def packed(self) -> bool:
        """False for the int8 storage (one int8 code per weight, one scale per row); True for packed codes."""
        return not (self.weight_bits == _INT8_BITS and self.symmetric and self.group_size is None
                    and self.row_groups is None)

    @property
    def scheme(self) -> LowBitScheme:
        return LowBitScheme(self.weight_bits, self.symmetric, self.group_size, self.row_groups)

    def weight_shapes(self, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the weight buffers of an [N=out_features, K=in_features] layer.

        int8: ``w_q`` [N, K], ``w_scale`` [N]. packed: ``w_packed`` [ceil(K/32)*bits, N], ``w_scale``
        [K groups, row groups] and, when asymmetric, ``w_zero`` of the same shape.
        """
        if not self.packed:
            return {"w_q": (out_features, in_features), "w_scale": (out_features,)}
        scales = self.scheme.scale_shape(out_features, in_features)
        shapes = {"w_packed": (packed_rows(in_features, self.weight_bits), out_features), "w_scale": scales}
        if not self.symmetric:
            shapes["w_zero"] = scales
        return shapes

    def nbytes(self, out_features: int, in_features: int) -> dict[str, int]:
        """Exact bytes of the weight buffers: codes, scales, zeros (the bias is not counted)."""
        if not self.packed:
            return {"codes": out_features * in_features * _INT8_BYTES, "scales": out_features * _FLOAT32_BYTES,
                    "zeros": 0}
        return self.scheme.nbytes(out_features, in_features)

    def describe(self) -> str:
        """``"w4a16 g128 asym"``, ``"w3a16 rows12 sym"``, ``"w8a8"``."""
        if not self.packed:
            return self.name
        granularity = (f"g{self.group_size}" if self.group_size is not None
                       else f"rows{self.row_groups}" if self.row_groups is not None else "channel")
        return f"{self.name} {granularity} {'sym' if self.symmetric else 'asym'}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, entry: dict) -> LinearFormat:
        """The inverse of ``to_dict``; unknown or missing keys are an error naming them."""
        fields = set(cls.__dataclass_fields__)
        if not isinstance(entry, dict) or set(entry) - fields or "name" not in entry:
            raise ValueError(f"LinearFormat.from_dict: expected a dict with 'name' and keys among "
                             f"{sorted(fields)}, got {entry!r}")
        base = linear_format(entry["name"])
        fmt = replace(base, **entry)
        if (fmt.weight_bits, fmt.activation_bits) != (base.weight_bits, base.activation_bits):
            raise ValueError(f"LinearFormat.from_dict: {entry!r} contradicts the mode {base.name!r}")
        return fmt


def _lowbit(bits: int, activation_bits: int | None) -> LinearFormat:
    name = f"w{bits}a{activation_bits or 16}"
    return LinearFormat(name, bits, activation_bits, symmetric=False, group_size=DEFAULT_GROUP_SIZE)


FORMATS: dict[str, LinearFormat] = {
    fmt.name: fmt
    for fmt in (
        LinearFormat("w8a8", weight_bits=_INT8_BITS, activation_bits=_INT8_BITS, symmetric=True),
        LinearFormat("w8a16", weight_bits=_INT8_BITS, activation_bits=None, symmetric=True),
        *(_lowbit(bits, None) for bits in (4, 3, 2)),
        *(_lowbit(bits, _INT8_BITS) for bits in (4, 3, 2)),
    )
}
INT8_MODES = tuple(name for name, fmt in FORMATS.items() if not fmt.packed)
assert INT8_QMAX == (1 << (_INT8_BITS - 1)) - 1  # the int8 storage is symmetric codes in [-127, 127]


def linear_format(mode: str | LinearFormat, *, group_size: int | None = None, row_groups: int | None = None,
                  symmetric: bool | None = None) -> LinearFormat:
    """The format named ``mode`` with optional overrides (``None`` keeps the format's default).

    group_size: K values per range, a multiple of 32, or -1 (``PER_CHANNEL``) for whole rows.
    row_groups: Q-BERT row groups (implies whole rows unless group_size is also given, which is an error).
    An unknown name is an error that lists the known ones; ``w8a8`` takes no overrides.
    """
    if isinstance(mode, LinearFormat):
        fmt = mode
    elif isinstance(mode, str) and mode in FORMATS:
        fmt = FORMATS[mode]
    else:
        raise ValueError(f"unknown quantization mode {mode!r}; known modes: {', '.join(FORMATS)}")
    overrides: dict = {}
    if group_size is not None:
        overrides["group_size"] = None if group_size == PER_CHANNEL else group_size
    if row_groups is not None:
        overrides["row_groups"] = row_groups
        overrides.setdefault("group_size", None)
    if symmetric is not None:
        overrides["symmetric"] = symmetric
    if not overrides:
        return fmt
    if fmt.activation_bits == _INT8_BITS and fmt.weight_bits == _INT8_BITS:
        raise ValueError(f"{fmt.name} is per-channel symmetric int8 and takes no group_size / row_groups / "
                         f"symmetric override; use w8a16 (weight-only) or a low-bit mode for those")
    return replace(fmt, **overrides)
