// Argument checks for the torch-facing launchers. Each failure names the op, the argument and what it
// got, e.g. "int8_gemm: b must be int8, got Float".
#pragma once

#include <torch/extension.h>

#include "common/constants.h"

#define QBERT_CHECK(cond, op, ...) TORCH_CHECK(cond, op, ": ", __VA_ARGS__)

#define QBERT_CHECK_DTYPE(t, dtype, op)                                                    \
  QBERT_CHECK((t).scalar_type() == (dtype), op, #t " must be ", c10::toString(dtype), ", got ", \
              c10::toString((t).scalar_type()))

#define QBERT_CHECK_DIM(t, ndim, op) \
  QBERT_CHECK((t).dim() == (ndim), op, #t " must be " #ndim "-D, got shape ", (t).sizes())

#define QBERT_CHECK_CONTIGUOUS(t, op) \
  QBERT_CHECK((t).is_contiguous(), op, #t " must be contiguous, got strides ", (t).strides())

#define QBERT_CHECK_CPU(t, op) \
  QBERT_CHECK((t).device().is_cpu(), op, #t " must be on the CPU, got ", (t).device())

namespace qbert {

// "bits must be one of [2, 3, 4, 8], got 5" unless Widths (a BitWidths of common/constants.h) holds bits.
template <class Widths>
void check_bits(const char* op, int64_t bits) {
  QBERT_CHECK(Widths::contains(bits), op, "bits must be one of ", c10::ArrayRef<int>(Widths::kValues), ", got ", bits);
}

// add_layernorm_quantize's launchers (cpu and cuda): the residual has x [M, K]'s shape, dtype and device
// and is contiguous; weight / bias are float [K] on x's device.
inline void check_layernorm_operands(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& residual,
                                     const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (residual) {
    QBERT_CHECK(residual->scalar_type() == x.scalar_type() && residual->sizes() == x.sizes(), op,
                "residual must have x's shape ", x.sizes(), " and dtype ", x.scalar_type(), ", got ",
                residual->sizes(), " ", residual->scalar_type());
    QBERT_CHECK(residual->device() == x.device(), op, "residual must be on x's device ", x.device(), ", got ",
                residual->device());
    QBERT_CHECK(residual->is_contiguous(), op, "residual must be contiguous, got strides ", residual->strides());
  }
  const int64_t K = x.size(1);
  for (const auto& [name, param] : {std::pair<const char*, const at::Tensor*>{"weight", &weight},
                                    {"bias", bias ? &*bias : nullptr}}) {
    if (param == nullptr) continue;
    QBERT_CHECK(at::isFloatingType(param->scalar_type()), op, name, " must be a float tensor, got ",
                param->scalar_type());
    QBERT_CHECK(param->dim() == 1 && param->size(0) == K, op, name, " must have shape [K=", K, "], got ",
                param->sizes());
    QBERT_CHECK(param->device() == x.device(), op, name, " must be on x's device ", x.device(), ", got ",
                param->device());
  }
}

}  // namespace qbert
