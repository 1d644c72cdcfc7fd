// add_layernorm_quantize_cuda / quantize_per_token_cuda: the torch-facing launchers of
// row_quantize_kernel.cuh. Specs: qbert/ops/add_layernorm_quantize.py and qbert/ops/quantize_per_token.py
// (the Python entry points check the inputs with full messages first; these checks guard direct calls of
// the backend ops).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "cuda/row_quantize/row_quantize_kernel.cuh"

namespace qbert::cuda::row_quantize {
namespace {

// The eps the kernel accepts (qbert/ops/add_layernorm_quantize.py's EPS_MIN / EPS_MAX): normal f32 numbers.
constexpr double kEpsMin = std::numeric_limits<float>::min();
constexpr double kEpsMax = std::numeric_limits<float>::max();

void check_x(const char* op, const at::Tensor& x) {
  QBERT_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got ", x.device());
  QBERT_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, "x must be Float, Half or BFloat16, got ", x.scalar_type());
  QBERT_CHECK_DIM(x, 2, op);
  QBERT_CHECK_CONTIGUOUS(x, op);
  QBERT_CHECK(x.size(1) >= 1, op, "x must have K >= 1, got shape ", x.sizes());
  // Params holds int sizes (rows are indexed with size_t).
  QBERT_CHECK(x.size(0) <= std::numeric_limits<int>::max() && x.size(1) <= std::numeric_limits<int>::max(), op,
              "M and K must fit int32, got x of shape ", x.sizes());
}


cudaError_t launch(at::ScalarType dtype, const Params& p, cudaStream_t stream) {
  switch (dtype) {
    case at::kFloat: return launch_row_quantize<float>(p, stream);
    case at::kHalf: return launch_row_quantize<__half>(p, stream);
    default: return launch_row_quantize<__nv_bfloat16>(p, stream);  // check_x admits nothing else
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_quantize_cuda(const at::Tensor& x,
                                                                           const std::optional<at::Tensor>& residual,
                                                                           const at::Tensor& weight,
                                                                           const std::optional<at::Tensor>& bias,
                                                                           double eps) {
  constexpr const char* op = "add_layernorm_quantize_cuda";
  check_x(op, x);
  check_layernorm_operands(op, x, residual, weight, bias);
  QBERT_CHECK(eps >= kEpsMin && eps <= kEpsMax, op, "eps must be a normal float32 number in [", kEpsMin, ", ",
              kEpsMax, "] (added to a float32 variance), got ", eps);

  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  // [K] each: the kernel reads f32 parameters (no copy when they already are contiguous f32).
  const at::Tensor weight_f32 = weight.to(at::kFloat).contiguous();
  const at::Tensor bias_f32 = bias ? bias->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor y = at::empty({M, K}, x.options());
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  const Params p{x.data_ptr(), residual ? residual->data_ptr() : nullptr, weight_f32.data_ptr<float>(),
                 bias ? bias_f32.data_ptr<float>() : nullptr, y.data_ptr(), q.data_ptr<int8_t>(),
                 scale.data_ptr<float>(), static_cast<int>(M), static_cast<int>(K), static_cast<float>(eps),
                 /*ldq=*/static_cast<int>(K)};
  C10_CUDA_CHECK(launch(x.scalar_type(), p, c10::cuda::getCurrentCUDAStream()));
  return {y, q, scale};
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x) {
  check_x("quantize_per_token_cuda", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kChar));
  at::Tensor scale = at::empty({M}, x.options().dtype(at::kFloat));
  const Params p{x.data_ptr(), nullptr, nullptr, nullptr, nullptr, q.data_ptr<int8_t>(), scale.data_ptr<float>(),
                 static_cast<int>(M), static_cast<int>(K), 0.f, /*ldq=*/static_cast<int>(K)};
  C10_CUDA_CHECK(launch(x.scalar_type(), p, c10::cuda::getCurrentCUDAStream()));
  return {q, scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("add_layernorm_quantize_cuda(Tensor x, Tensor? residual, Tensor weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("quantize_per_token_cuda(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qbert, CUDA, m) {
  m.impl("add_layernorm_quantize_cuda", &add_layernorm_quantize_cuda);
  m.impl("quantize_per_token_cuda", &quantize_per_token_cuda);
}

}  // namespace qbert::cuda::row_quantize
