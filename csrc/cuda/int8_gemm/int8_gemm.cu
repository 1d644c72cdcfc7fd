// int8_gemm_cuda / int8_linear_cuda / int8_linear_requant_cuda: the torch-facing launchers of
// int8_gemm_kernel.cuh. Specs: qbert/ops/int8_gemm.py, int8_linear.py and int8_linear_requant.py (the
// Python entry points check the inputs with full messages first and flatten them to 2-D; these checks
// guard direct calls of the backend ops).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "common/checks.h"
#include "common/constants.h"
#include "cuda/int8_gemm/int8_gemm_kernel.cuh"

namespace qbert::cuda::int8 {
namespace {

// The kernels copy 16-byte pieces of each a / b row, so K must be a multiple of 16 and rows must start
// 16-byte aligned.
constexpr int64_t kKAlign = kCpAsyncBytes;

DeviceInfo device_info(int device) {
  DeviceInfo info{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.smem_reserved_per_cta, cudaDevAttrReservedSharedMemoryPerBlock, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&info.threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device));
  return info;
}

bool row_aligned(const at::Tensor& x) {
  return x.size(1) % kKAlign == 0 && reinterpret_cast<uintptr_t>(x.data_ptr()) % kKAlign == 0;
}

// x [R, K] as the kernels need it: itself when K % 16 == 0 and rows are aligned, else a copy zero-padded
// along K to k_padded (exact: the padded codes multiply zeros, adding 0 to every dot product).
at::Tensor aligned_operand(const at::Tensor& x, int64_t k_padded) {
  if (x.size(1) == k_padded && row_aligned(x)) return x;
  at::Tensor padded = at::zeros({x.size(0), k_padded}, x.options());
  padded.narrow(1, 0, x.size(1)).copy_(x);
  return padded;
}

void check_operands(const char* op, const at::Tensor& a, const at::Tensor& b, const char* a_name, const char* b_name) {
  QBERT_CHECK(a.is_cuda(), op, a_name, " must be a CUDA tensor, got ", a.device());
  QBERT_CHECK(a.scalar_type() == at::kChar && b.scalar_type() == at::kChar, op, a_name, " and ", b_name,
              " must be int8, got ", a.scalar_type(), " and ", b.scalar_type());
  QBERT_CHECK(a.dim() == 2 && b.dim() == 2, op, a_name, " and ", b_name, " must be 2-D, got shapes ", a.sizes(),
              " and ", b.sizes());
  QBERT_CHECK(a.size(1) == b.size(1), op, "K mismatch: ", a_name, " is ", a.sizes(), ", ", b_name, " is ", b.sizes());
  QBERT_CHECK(a.size(1) >= 1 && a.size(1) <= kInt8GemmMaxK, op, "K must be in [1, ", kInt8GemmMaxK,
              "] (beyond it an int32 accumulator can overflow), got ", a.size(1));
  QBERT_CHECK(b.device() == a.device(), op, "all tensors must be on one device, got ", b.device(), " and ", a.device());
  QBERT_CHECK(a.is_contiguous() && b.is_contiguous(), op, a_name, " and ", b_name, " must be contiguous, got strides ",
              a.strides(), " and ", b.strides());
  // GemmParams holds int sizes and the kernels index with int products up to these.
  const int64_t k_padded = (a.size(1) + kKAlign - 1) / kKAlign * kKAlign;
  QBERT_CHECK(a.size(0) * b.size(0) <= INT32_MAX && a.size(0) * k_padded <= INT32_MAX &&
                  b.size(0) * k_padded <= INT32_MAX,
              op, "sizes must fit int32 (M*N, M*K, N*K), got ", a_name, " ", a.sizes(), " and ", b_name, " ",
              b.sizes());
}

// x_scale [M], w_scale [N] float32 and bias [N] (any float dtype) or none, on the operands' device.
void check_scales(const char* op, const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                  const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  const int64_t M = x_q.size(0), N = w_q.size(0);
  QBERT_CHECK_DTYPE(x_scale, at::kFloat, op);
  QBERT_CHECK_DTYPE(w_scale, at::kFloat, op);
  QBERT_CHECK(x_scale.dim() == 1 && x_scale.size(0) == M, op, "x_scale must have shape [M=", M, "], got ",
              x_scale.sizes());
  QBERT_CHECK(w_scale.dim() == 1 && w_scale.size(0) == N, op, "w_scale must have shape [N=", N, "], got ",
              w_scale.sizes());
  for (const at::Tensor* t : {&x_scale, &w_scale}) {
    QBERT_CHECK(t->device() == x_q.device(), op, "all tensors must be on one device, got ", t->device(), " and ",
                x_q.device());
    QBERT_CHECK(t->is_contiguous(), op, "x_scale and w_scale must be contiguous, got strides ", t->strides());
  }
  if (bias) {
    QBERT_CHECK(bias->dim() == 1 && bias->size(0) == N, op, "bias must have shape [N=", N, "], got ", bias->sizes());
    QBERT_CHECK(at::isFloatingType(bias->scalar_type()), op, "bias must be a float tensor, got ", bias->scalar_type());
    QBERT_CHECK(bias->device() == x_q.device(), op, "all tensors must be on one device, got ", bias->device(),
                " and ", x_q.device());
  }
}

Act parse_activation(const char* op, const std::string& activation) {
  if (activation == "none") return Act::kNone;
  if (activation == "gelu") return Act::kGelu;
  QBERT_CHECK(false, op, "activation must be \"none\" or \"gelu\", got \"", activation, "\"");
  return Act::kNone;
}

// The operands and plan of one call: a and b padded if needed, p.a / p.b / M / N / K filled in.
struct Setup {
  at::Tensor a, b;
  GemmParams p{};
  Plan plan{};
};

Setup prepare(const char* op, const at::Tensor& a, const at::Tensor& b, OutKind kind) {
  Setup s;
  const int64_t k_padded = (a.size(1) + kKAlign - 1) / kKAlign * kKAlign;
  s.a = aligned_operand(a, k_padded);
  s.b = aligned_operand(b, k_padded);
  s.p.a = s.a.data_ptr<int8_t>();
  s.p.b = s.b.data_ptr<int8_t>();
  s.p.M = static_cast<int>(a.size(0));
  s.p.N = static_cast<int>(b.size(0));
  s.p.K = static_cast<int>(k_padded);
  const DeviceInfo dev = device_info(a.get_device());
  s.plan = plan_int8_gemm(s.p.M, s.p.N, s.p.K, kind, dev);
  QBERT_CHECK(s.plan.status != PlanStatus::kUnsupportedDevice, op, "needs a GPU of compute capability 8.x or 9.0, got ",
              dev.cc_major, ".", dev.cc_minor);
  QBERT_CHECK(s.plan.status != PlanStatus::kRowTooWide, op, "N=", s.p.N, " is too wide for the fused per-token ",
              "requantization: its ", s.plan.n_tiles, " column tiles of ", s.plan.block_n,
              " must run at once, but this GPU holds ", s.plan.coresident, " CTAs");
  return s;
}

// The bias as the epilogue reads it: the tensor itself when it is f32 / f16 / bf16 and contiguous (the
// usual case: a layer's own bias), else a contiguous f32 copy. Returned to keep a copy alive.
at::Tensor fill_epilogue(GemmParams& p, const at::Tensor& x_scale, const at::Tensor& w_scale,
                         const std::optional<at::Tensor>& bias) {
  p.x_scale = x_scale.data_ptr<float>();
  p.w_scale = w_scale.data_ptr<float>();
  p.bias = nullptr;
  p.bias_kind = BiasKind::kNone;
  if (!bias) return {};
  const at::ScalarType t = bias->scalar_type();
  const bool native = t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
  at::Tensor b = native ? bias->contiguous() : bias->to(at::kFloat).contiguous();
  p.bias = b.data_ptr();
  p.bias_kind = b.scalar_type() == at::kHalf       ? BiasKind::kF16
                : b.scalar_type() == at::kBFloat16 ? BiasKind::kBF16
                                                   : BiasKind::kF32;
  return b;
}

template <OutKind kOut>
void run_plan(const char* op, const GemmParams& p, const Plan& plan, Act act) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  cudaError_t err;
  if constexpr (kOut == OutKind::kI32) {
    err = launch_int8_gemm<kOut, Act::kNone>(p, plan, stream);  // int8_gemm has no activation
  } else {
    err = act == Act::kGelu ? launch_int8_gemm<kOut, Act::kGelu>(p, plan, stream)
                            : launch_int8_gemm<kOut, Act::kNone>(p, plan, stream);
  }
  QBERT_CHECK(err != cudaErrorCooperativeLaunchTooLarge, op, "the ", plan.n_tiles, " column tiles of a row must ",
              "run at once for the per-token requantization, but fewer than the planned ", plan.ctas_per_sm,
              " CTAs per SM fit on this GPU");
  C10_CUDA_CHECK(err);
}

at::Tensor int8_gemm_cuda(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "int8_gemm_cuda";
  check_operands(op, a, b, "a", "b");
  const c10::cuda::CUDAGuard guard(a.device());
  at::Tensor out = at::empty({a.size(0), b.size(0)}, a.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  Setup s = prepare(op, a, b, OutKind::kI32);
  s.p.out = out.data_ptr();
  run_plan<OutKind::kI32>(op, s.p, s.plan, Act::kNone);
  return out;
}

at::Tensor int8_linear_cuda(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                            const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                            const std::string& activation) {
  constexpr const char* op = "int8_linear_cuda";
  check_operands(op, x_q, w_q, "x_q", "w_q");
  check_scales(op, x_q, x_scale, w_q, w_scale, bias);
  QBERT_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
              "out_dtype must be Float, Half or BFloat16, got ", out_dtype);
  const Act act = parse_activation(op, activation);
  const c10::cuda::CUDAGuard guard(x_q.device());
  at::Tensor out = at::empty({x_q.size(0), w_q.size(0)}, x_q.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  Setup s = prepare(op, x_q, w_q, out_dtype == at::kFloat ? OutKind::kF32
                                  : out_dtype == at::kHalf ? OutKind::kF16
                                                           : OutKind::kBF16);
  const at::Tensor bias_in = fill_epilogue(s.p, x_scale, w_scale, bias);
  s.p.out = out.data_ptr();
  switch (out_dtype) {
    case at::kFloat: run_plan<OutKind::kF32>(op, s.p, s.plan, act); break;
    case at::kHalf: run_plan<OutKind::kF16>(op, s.p, s.plan, act); break;
    default: run_plan<OutKind::kBF16>(op, s.p, s.plan, act); break;  // checked above: BFloat16
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> int8_linear_requant_cuda(const at::Tensor& x_q, const at::Tensor& x_scale,
                                                            const at::Tensor& w_q, const at::Tensor& w_scale,
                                                            const std::optional<at::Tensor>& bias,
                                                            const std::string& activation) {
  constexpr const char* op = "int8_linear_requant_cuda";
  check_operands(op, x_q, w_q, "x_q", "w_q");
  check_scales(op, x_q, x_scale, w_q, w_scale, bias);
  const Act act = parse_activation(op, activation);
  const c10::cuda::CUDAGuard guard(x_q.device());
  const int64_t M = x_q.size(0), N = w_q.size(0);
  at::Tensor y_q = at::empty({M, N}, x_q.options());
  // A row with no columns has amax 0: scale 1, as quantize_per_token gives an all-zero row.
  if (N == 0) return {y_q, at::ones({M}, x_q.options().dtype(at::kFloat))};
  at::Tensor y_scale = at::empty({M}, x_q.options().dtype(at::kFloat));
  if (M == 0) return {y_q, y_scale};
  Setup s = prepare(op, x_q, w_q, OutKind::kS8);
  const at::Tensor bias_in = fill_epilogue(s.p, x_scale, w_scale, bias);
  s.p.out = y_q.data_ptr();
  s.p.out_scale = y_scale.data_ptr<float>();
  // Per-call workspace: each (row, column tile)'s partial amax, and each row block's arrival counter,
  // which must start at zero (the epilogue waits for it to reach n_tiles).
  const at::Tensor amax_partial = at::empty({M, s.plan.n_tiles}, x_q.options().dtype(at::kFloat));
  const at::Tensor arrivals = at::zeros({s.plan.m_tiles}, x_q.options().dtype(at::kInt));
  s.p.amax_partial = amax_partial.data_ptr<float>();
  s.p.row_block_arrivals = arrivals.data_ptr<int>();
  run_plan<OutKind::kS8>(op, s.p, s.plan, act);
  return {y_q, y_scale};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("int8_gemm_cuda(Tensor a, Tensor b) -> Tensor");
  m.def("int8_linear_cuda(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype, str activation) -> Tensor");
  m.def("int8_linear_requant_cuda(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, "
        "str activation) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qbert, CUDA, m) {
  m.impl("int8_gemm_cuda", &int8_gemm_cuda);
  m.impl("int8_linear_cuda", &int8_linear_cuda);
  m.impl("int8_linear_requant_cuda", &int8_linear_requant_cuda);
}

}  // namespace qbert::cuda::int8
