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

from qbert.ops.w4a8_linear import W4A8_BITS
from qbert.quant.int8 import INT8_QMAX
from qbert.quant.lowbit import LowBitScheme
from qbert.quant.packing import packed_rows

_INT8_BITS = 8
_FLOAT32_BYTES = 4
_INT8_BYTES = 1
DEFAULT_GROUP_SIZE = 128
PER_CHANNEL = -1  # the group_size override meaning "one range per output channel" (GPTQ's convention)
_FLOAT_ACTIVATIONS_NAME = 16  # the "a16" of a mode name: activations stay in floating point


def check_option(owner: str, option: str, value, expected: type, *, optional: bool = False) -> None:
    """TypeError naming ``owner``, ``option`` and the value's type unless ``value`` is an ``expected``
    (``None`` too when ``optional``). A bool is not accepted as an int (``group_size=True`` is a mistake)."""
    if value is None and optional:
        return
    if isinstance(value, expected) and (expected is bool or not isinstance(value, bool)):
        return
    wanted = f"{expected.__name__} or None" if optional else expected.__name__
    raise TypeError(f"{owner}: {option} must be {wanted}, got {type(value).__name__} {value!r}")


def mode_name(weight_bits: int, activation_bits: int | None) -> str:
    """``"w4a16"`` for 4-bit weights and float activations, ``"w4a8"`` with int8 activations."""
    return f"w{weight_bits}a{activation_bits or _FLOAT_ACTIVATIONS_NAME}"


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
        """Refuse a format no op serves: wrong field types, activation bits other than 8 or None, a name
        that contradicts the bits, and packed 8-bit weights with int8 activations (``w4a8_linear`` takes
        2-4 bits; 8-bit weights with int8 activations are exactly ``w8a8``, which has no overrides)."""
        check_option("LinearFormat", "name", self.name, str)
        check_option("LinearFormat", "weight_bits", self.weight_bits, int)
        check_option("LinearFormat", "activation_bits", self.activation_bits, int, optional=True)
        check_option("LinearFormat", "symmetric", self.symmetric, bool)
        check_option("LinearFormat", "group_size", self.group_size, int, optional=True)
        check_option("LinearFormat", "row_groups", self.row_groups, int, optional=True)
        if self.activation_bits not in (None, _INT8_BITS):
            raise ValueError(f"LinearFormat: activation_bits must be {_INT8_BITS} (int8 per token) or None "
                             f"(floating point), got {self.activation_bits!r}")
        expected = mode_name(self.weight_bits, self.activation_bits)
        if self.name != expected:
            raise ValueError(f"LinearFormat: weight_bits={self.weight_bits}, activation_bits={self.activation_bits} "
                             f"(a {expected} format) contradicts the mode {self.name!r}")
        if self.packed and self.activation_bits == _INT8_BITS and self.weight_bits not in W4A8_BITS:
            raise ValueError(f"LinearFormat: {self.name} is per-channel symmetric int8 and takes no group_size / "
                             f"row_groups / symmetric override (packed weights with int8 activations have "
                             f"{' / '.join(map(str, W4A8_BITS))} bits); got {self!r}")
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
        """The inverse of ``to_dict``: every field, no other key, a known mode name and values of the field
        types (``__post_init__``); anything else is an error naming the problem."""
        fields = list(cls.__dataclass_fields__)
        if not isinstance(entry, dict):
            raise ValueError(f"LinearFormat.from_dict: expected a dict with the keys {fields}, got "
                             f"{type(entry).__name__} {entry!r}")
        unknown, missing = sorted(set(entry) - set(fields), key=str), [f for f in fields if f not in entry]
        if unknown or missing:
            raise ValueError(f"LinearFormat.from_dict: expected the keys {fields}; unknown keys {unknown}, "
                             f"missing keys {missing}, in {entry!r}")
        linear_format(entry["name"])  # a known mode name, or the error listing them
        return cls(**entry)


def _lowbit(bits: int, activation_bits: int | None) -> LinearFormat:
    return LinearFormat(mode_name(bits, activation_bits), bits, activation_bits, symmetric=False,
                        group_size=DEFAULT_GROUP_SIZE)


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
    symmetric: a bool. Options of another type are a TypeError naming them.
    An unknown name is an error that lists the known ones; ``w8a8`` takes no overrides.
    """
    if not isinstance(mode, (str, LinearFormat)):
        raise TypeError(f"linear_format: mode must be a mode name (str) or a LinearFormat, got "
                        f"{type(mode).__name__} {mode!r}")
    check_option("linear_format", "group_size", group_size, int, optional=True)
    check_option("linear_format", "row_groups", row_groups, int, optional=True)
    check_option("linear_format", "symmetric", symmetric, bool, optional=True)
    if isinstance(mode, LinearFormat):
        fmt = mode
    elif mode in FORMATS:
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
