// Argument checks for the torch-facing launchers. Each failure names the op, the argument and what it
// got, e.g. "int8_gemm: b must be int8, got Float".
#pragma once

#include <torch/extension.h>

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
