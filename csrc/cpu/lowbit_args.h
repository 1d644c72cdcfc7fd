// Argument checks and operand preparation shared by lowbit_linear_cpu and w4a8_linear_cpu, which take
// the same arguments (specs: qbert/ops/lowbit_linear.py, qbert/ops/w4a8_linear.py).
#pragma once

#include <optional>

#include "common/checks.h"
#include "cpu/lowbit_unpack.h"

namespace qbert::cpu::lowbit {

// What the kernels read besides x and w_packed: contiguous CPU tensors in the kernels' dtypes.
struct Operands {
  int64_t M, N, K, groups;
  at::Tensor zeros;  // uint8 [groups, N]: the given zeros, or the implicit 2**(bits-1) of symmetric codes
  at::Tensor bias;   // float32 [N], or undefined when there is none
};

// Widths: the op's bit widths (LowbitBits or W4A8Bits, common/constants.h).
template <class Widths>
Operands check_operands(const char* op, const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                        const std::optional<at::Tensor>& maybe_zeros, int64_t bits, int64_t group_size,
                        const std::optional<at::Tensor>& maybe_bias) {
  QBERT_CHECK_CPU(x, op);
  QBERT_CHECK_DIM(x, 2, op);
  QBERT_CHECK_CONTIGUOUS(x, op);
  QBERT_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, "x must be Float, Half or BFloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), K = x.size(1);
  QBERT_CHECK(K >= 1, op, "K must be >= 1, got x of shape ", x.sizes());
  check_bits<Widths>(op, bits);
  QBERT_CHECK(group_size >= 1 && (group_size % kPackChunk == 0 || group_size >= K), op,
              "group_size must be a positive multiple of ", kPackChunk, ", or >= K=", K,
              " (one group per row), got ", group_size);

  QBERT_CHECK_CPU(w_packed, op);
  QBERT_CHECK_DTYPE(w_packed, at::kInt, op);
  QBERT_CHECK_DIM(w_packed, 2, op);
  QBERT_CHECK_CONTIGUOUS(w_packed, op);
  const int64_t rows = chunks(K) * bits, N = w_packed.size(1);
  QBERT_CHECK(w_packed.size(0) == rows, op, "w_packed must have ceil(K/", kPackChunk, ")*bits = ", rows,
              " rows for K=", K, ", bits=", bits, ", got shape ", w_packed.sizes());

  const int64_t groups = (K + group_size - 1) / group_size;
  QBERT_CHECK_CPU(scales, op);
  QBERT_CHECK_DTYPE(scales, at::kFloat, op);
  QBERT_CHECK_CONTIGUOUS(scales, op);
  QBERT_CHECK(scales.dim() == 2 && scales.size(0) == groups && scales.size(1) == N, op,
              "scales must have shape [ceil(K/group_size)=", groups, ", N=", N, "], got ", scales.sizes());
  Operands o{M, N, K, groups, {}, {}};
  if (maybe_zeros.has_value()) {
    const at::Tensor& zeros = *maybe_zeros;
    QBERT_CHECK_CPU(zeros, op);
    QBERT_CHECK_DTYPE(zeros, at::kByte, op);
    QBERT_CHECK_CONTIGUOUS(zeros, op);
    QBERT_CHECK(zeros.sizes() == scales.sizes(), op, "zeros must have shape [ceil(K/group_size)=", groups, ", N=", N,
                "] (like scales), got ", zeros.sizes());
    o.zeros = zeros;
  } else {
    o.zeros = at::full({groups, N}, int64_t{1} << (bits - 1), scales.options().dtype(at::kByte));
  }
  if (maybe_bias.has_value()) {
    const at::Tensor& bias = *maybe_bias;
    QBERT_CHECK_CPU(bias, op);
    QBERT_CHECK(bias.scalar_type() == at::kFloat || bias.scalar_type() == at::kHalf ||
                    bias.scalar_type() == at::kBFloat16,
                op, "bias must be Float, Half or BFloat16, got ", bias.scalar_type());
    QBERT_CHECK(bias.dim() == 1 && bias.size(0) == N, op, "bias must have shape [N=", N, "], got ", bias.sizes());
    o.bias = bias.to(at::kFloat).contiguous();  // the reference adds bias.float()
  }
  return o;
}

}  // namespace qbert::cpu::lowbit
