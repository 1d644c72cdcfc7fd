// lowbit_linear_cuda / w4a8_linear_cuda: the torch-facing launchers of lowbit_linear_kernel.cuh.
// Specs: qbert/ops/lowbit_linear.py and qbert/ops/w4a8_linear.py (the Python entry points check the
// inputs with full messages first; these checks guard direct calls of the backend ops).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "common/constants.h"
#include "cuda/lowbit_linear/lowbit_linear_kernel.cuh"
#include "cuda/row_quantize/row_quantize_kernel.cuh"

namespace qbert::cuda::lowbit {
namespace {

// The mma paths copy 16-byte pieces of each x row: rows must start 16-byte aligned.
constexpr int64_t kRowAlignBytes = kCpAsyncBytes;

int sm_count(int device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

bool aligned_rows(const at::Tensor& x) {
  return (x.size(1) * x.element_size()) % kRowAlignBytes == 0 &&
         reinterpret_cast<uintptr_t>(x.data_ptr()) % kRowAlignBytes == 0;
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                  const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                  const std::optional<at::Tensor>& bias, bool a8) {
  QBERT_CHECK(x.is_cuda(), op, "x must be a CUDA tensor, got ", x.device());
  QBERT_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              op, "x must be Float, Half or BFloat16, got ", x.scalar_type());
  QBERT_CHECK_DIM(x, 2, op);
  if (a8) check_bits<W4A8Bits>(op, bits);
  else check_bits<LowbitBits>(op, bits);
  const int64_t K = x.size(1), chunks = (K + kPackChunk - 1) / kPackChunk;
  QBERT_CHECK(K >= 1, op, "K must be >= 1, got x of shape ", x.sizes());
  QBERT_CHECK(group_size >= 1 && (group_size % kPackChunk == 0 || group_size >= K), op,
              "group_size must be a positive multiple of ", kPackChunk, ", or >= K=", K, ", got ", group_size);
  QBERT_CHECK(!a8 || std::min(group_size, K) <= kW4A8MaxGroupK, op, "a K group of min(group_size=", group_size,
              ", K=", K, ") elements exceeds ", kW4A8MaxGroupK, ", beyond which its int32 sum can overflow");
  QBERT_CHECK_DTYPE(w_packed, at::kInt, op);
  QBERT_CHECK_DIM(w_packed, 2, op);
  QBERT_CHECK(w_packed.size(0) == chunks * bits, op, "w_packed must have ceil(K/", kPackChunk, ")*bits = ",
              chunks * bits, " rows for K=", K, ", bits=", bits, ", got shape ", w_packed.sizes());
  const int64_t N = w_packed.size(1), groups = (K + group_size - 1) / group_size;
  QBERT_CHECK_DTYPE(scales, at::kFloat, op);
  QBERT_CHECK(scales.dim() == 2 && scales.size(0) == groups && scales.size(1) == N, op,
              "scales must have shape [ceil(K/group_size)=", groups, ", N=", N, "], got ", scales.sizes());
  if (zeros) {
    QBERT_CHECK_DTYPE(*zeros, at::kByte, op);
    QBERT_CHECK(zeros->sizes() == scales.sizes(), op, "zeros must have shape ", scales.sizes(), " (like scales), got ",
                zeros->sizes());
  }
  if (bias) {
    QBERT_CHECK(bias->dim() == 1 && bias->size(0) == N, op, "bias must have shape [N=", N, "], got ", bias->sizes());
    QBERT_CHECK(at::isFloatingType(bias->scalar_type()), op, "bias must be a float tensor, got ", bias->scalar_type());
  }
  for (const at::Tensor* t : {&x, &w_packed, &scales}) {
    QBERT_CHECK(t->device() == x.device(), op, "all tensors must be on one device, got ", t->device(), " and ",
                x.device());
    QBERT_CHECK(t->is_contiguous(), op, "every tensor must be contiguous, got strides ", t->strides());
  }
  for (const auto* t : {&zeros, &bias}) {
    if (!*t) continue;
    QBERT_CHECK((*t)->device() == x.device(), op, "all tensors must be on one device, got ", (*t)->device(),
                " and ", x.device());
    QBERT_CHECK((*t)->is_contiguous(), op, "every tensor must be contiguous, got strides ", (*t)->strides());
  }
  // Params holds int sizes and the kernels index rows with int.
  QBERT_CHECK(x.numel() < INT32_MAX && w_packed.numel() < INT32_MAX && x.size(0) * N < INT32_MAX, op,
              "sizes must fit int32, got x ", x.sizes(), " and w_packed ", w_packed.sizes());
}

Params make_params(const at::Tensor& w_packed, const at::Tensor& scales, const std::optional<at::Tensor>& zeros,
                   const std::optional<at::Tensor>& bias_f32, int64_t group_size, int M, int K) {
  Params p{};
  p.w = w_packed.data_ptr<int32_t>();
  p.scales = scales.data_ptr<float>();
  p.zeros = zeros ? zeros->data_ptr<uint8_t>() : nullptr;
  p.bias = bias_f32 ? bias_f32->data_ptr<float>() : nullptr;
  p.M = M;
  p.N = static_cast<int>(w_packed.size(1));
  p.chunks = (K + kPackChunk - 1) / kPackChunk;
  p.group_chunks = static_cast<int>((std::min<int64_t>(group_size, K) + kPackChunk - 1) / kPackChunk);
  p.groups = (p.chunks + p.group_chunks - 1) / p.group_chunks;
  return p;
}

// Writes the plan into p and allocates the split-K workspace it needs.
at::Tensor apply_plan(Params& p, const Plan& plan, const at::Tensor& x) {
  p.splits = plan.splits;
  p.split_chunks = plan.split_chunks;
  if (plan.splits == 1) return {};
  at::Tensor partial = at::empty({plan.splits, p.M, p.N}, x.options().dtype(at::kFloat));
  p.partial = partial.data_ptr<float>();
  return partial;
}

template <class F>
void switch_dtype(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(__half{});
    default: return f(__nv_bfloat16{});  // check_inputs admits nothing else
  }
}

at::Tensor run(const char* op, const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
               const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
               const std::optional<at::Tensor>& bias, bool a8) {
  check_inputs(op, x, w_packed, scales, zeros, bits, group_size, bias, a8);
  const c10::cuda::CUDAGuard guard(x.device());
  const int M = static_cast<int>(x.size(0)), K = static_cast<int>(x.size(1));
  at::Tensor out = at::empty({M, w_packed.size(1)}, x.options());
  if (out.numel() == 0) return out;
  std::optional<at::Tensor> bias_f32;
  if (bias) bias_f32 = bias->to(at::kFloat);  // [N]: the kernels read one f32 bias
  Params p = make_params(w_packed, scales, zeros, bias_f32, group_size, M, K);
  p.out = out.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool f32 = x.scalar_type() == at::kFloat;
  const Plan plan = plan_launch(M, p.N, p.chunks, a8, f32, sm_count(x.get_device()));
  const at::Tensor partial = apply_plan(p, plan, x);
  cudaError_t err = cudaSuccess;

  at::Tensor x_in = x, x_q, x_scale;
  if (a8) {
    // x_q rows padded to whole chunks with zeros: 16-byte aligned rows for the mma path's copies.
    p.lda = p.chunks * kPackChunk;
    x_q = at::empty({M, p.lda}, x.options().dtype(at::kChar));
    x_scale = at::empty({M}, x.options().dtype(at::kFloat));
    switch_dtype(x.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      err = row_quantize::launch_quantize_per_token<T>(static_cast<const T*>(x.data_ptr()), M, K, p.lda,
                                                       x_q.data_ptr<int8_t>(), x_scale.data_ptr<float>(), stream);
    });
    C10_CUDA_CHECK(err);
    p.x = x_q.data_ptr();
    p.x_scale = x_scale.data_ptr<float>();
  } else {
    if (!f32 && !aligned_rows(x)) {
      // Ragged K (K * 2 bytes not a multiple of 16) or an unaligned view: a zero-padded copy of x.
      x_in = at::constant_pad_nd(x, {0, p.chunks * kPackChunk - K});
    }
    p.x = x_in.data_ptr();
    p.lda = static_cast<int>(x_in.size(1));
  }
  switch_dtype(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    err = a8 ? launch_lowbit_a8<T>(p, static_cast<int>(bits), plan.path, stream)
             : launch_lowbit_a16<T>(p, static_cast<int>(bits), plan.path, stream);
  });
  C10_CUDA_CHECK(err);
  return out;
}

at::Tensor lowbit_linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                              const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                              const std::optional<at::Tensor>& bias) {
  return run("lowbit_linear_cuda", x, w_packed, scales, zeros, bits, group_size, bias, /*a8=*/false);
}

at::Tensor w4a8_linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                            const std::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                            const std::optional<at::Tensor>& bias) {
  return run("w4a8_linear_cuda", x, w_packed, scales, zeros, bits, group_size, bias, /*a8=*/true);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("lowbit_linear_cuda(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "Tensor? bias) -> Tensor");
  m.def("w4a8_linear_cuda(Tensor x, Tensor w_packed, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(qbert, CUDA, m) {
  m.impl("lowbit_linear_cuda", &lowbit_linear_cuda);
  m.impl("w4a8_linear_cuda", &w4a8_linear_cuda);
}

}  // namespace qbert::cuda::lowbit
