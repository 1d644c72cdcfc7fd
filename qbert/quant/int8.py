"""Symmetric int8: codes in [-127, 127], value = code * scale, round half to even.

-128 is never produced by qbert's quantizers (the range stays symmetric), but every int8 GEMM accepts it.
"""

INT8_QMAX = 127
_INT8_ABS_MAX = 128  # |-128|: the largest magnitude an int8 operand can have

# The largest K for which an int8 x int8 dot product is exact in int32 whatever the codes:
# K * 128 * 128 <= 2**31 - 1.
INT8_GEMM_MAX_K = (2**31 - 1) // (_INT8_ABS_MAX * _INT8_ABS_MAX)
