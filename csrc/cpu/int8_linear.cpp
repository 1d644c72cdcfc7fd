// int8_linear_cpu: out [M, N] = ((float(x_q @ w_q.T) * x_scale[m]) * w_scale[n]) + bias[n], cast to
// out_dtype. Spec: qbert/ops/int8_linear.py::int8_linear_reference. The dequantization runs in the
// GEMM's epilogue on each finished int32 tile (gemm_epilogue.h): no [M, N] int32 intermediate.
// int8_linear_gelu_cpu: gelu of that, float32. On AVX-512 the GELU runs in the epilogue too (gelu16: qbert's
// erf, the same math as torch's GELU within a few ulp, so the float32 y makes no extra round trip through
// memory); on the other ISAs torch's GELU runs on the finished y (the reference's bits).
#include "common/checks.h"
#include "cpu/gemm_driver.h"
#include "cpu/parallel.h"
#include "cpu/weight_cache.h"

namespace qbert::cpu {
namespace {

BiasKind bias_kind(const at::Tensor& bias, const char* op) {
  switch (bias.scalar_type()) {
    case at::kFloat: return BiasKind::kF32;
    case at::kHalf: return BiasKind::kF16;
    case at::kBFloat16: return BiasKind::kBF16;
    default: QBERT_CHECK(false, op, "bias must be Float, Half or BFloat16, got ", bias.scalar_type());
  }
  return BiasKind::kNone;
}

OutKind out_kind(at::ScalarType dtype, const char* op) {
  switch (dtype) {
    case at::kFloat: return OutKind::kF32;
    case at::kHalf: return OutKind::kF16;
    case at::kBFloat16: return OutKind::kBF16;
    default: QBERT_CHECK(false, op, "out_dtype must be Float, Half or BFloat16, got ", dtype);
  }
  return OutKind::kF32;
}

at::Tensor linear(const char* op, const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                  const at::Tensor& w_scale, const std::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                  Isa isa, bool gelu) {
  for (const at::Tensor* t : {&x_q, &x_scale, &w_q, &w_scale}) {
    QBERT_CHECK((*t).device().is_cpu(), op, "every tensor must be on the CPU, got ", (*t).device());
    QBERT_CHECK((*t).is_contiguous(), op, "every tensor must be contiguous, got strides ", (*t).strides());
  }
  QBERT_CHECK_DTYPE(x_q, at::kChar, op);
  QBERT_CHECK_DTYPE(w_q, at::kChar, op);
  QBERT_CHECK_DTYPE(x_scale, at::kFloat, op);
  QBERT_CHECK_DTYPE(w_scale, at::kFloat, op);
  QBERT_CHECK_DIM(x_q, 2, op);
  QBERT_CHECK_DIM(w_q, 2, op);
  const int64_t M = x_q.size(0), N = w_q.size(0), K = x_q.size(1);
  QBERT_CHECK(w_q.size(1) == K, op, "K mismatch: x_q is ", x_q.sizes(), ", w_q is ", w_q.sizes());
  QBERT_CHECK(K >= 1 && K <= kInt8GemmMaxK, op, "K must be in [1, ", kInt8GemmMaxK,
              "] (beyond it an int32 accumulator can overflow), got x_q of shape ", x_q.sizes());
  QBERT_CHECK(x_scale.dim() == 1 && x_scale.size(0) == M, op, "x_scale must have shape [M=", M, "], got ",
              x_scale.sizes());
  QBERT_CHECK(w_scale.dim() == 1 && w_scale.size(0) == N, op, "w_scale must have shape [N=", N, "], got ",
              w_scale.sizes());

  Epilogue epi;
  epi.x_scale = x_scale.data_ptr<float>();
  epi.w_scale = w_scale.data_ptr<float>();
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    QBERT_CHECK_CPU(b, op);
    QBERT_CHECK_CONTIGUOUS(b, op);
    QBERT_CHECK(b.dim() == 1 && b.size(0) == N, op, "bias must have shape [N=", N, "], got ", b.sizes());
    epi.bias_kind = bias_kind(b, op);
    epi.bias = b.data_ptr();
  }
  epi.out_kind = out_kind(out_dtype, op);
  at::Tensor out = at::empty({M, N}, x_q.options().dtype(out_dtype));
  epi.out = out.data_ptr();
  epi.ldo = N;
  epi.gelu = gelu;  // honoured by the AVX-512 kernels only: the caller asks for it with those alone
  // Held for the call: the cache may drop its entry meanwhile (another thread's in-place change of w_q).
  const at::Tensor packed = amx_packs(isa, N, K) ? packed_weight(w_q) : at::Tensor();
  int8_gemm_fused(x_q.data_ptr<int8_t>(), w_q.data_ptr<int8_t>(), M, N, K, epi, isa,
                  packed.defined() ? packed.data_ptr<uint8_t>() : nullptr);
  return out;
}

}  // namespace

at::Tensor int8_linear_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           at::ScalarType out_dtype) {
  return linear("int8_linear_cpu", x_q, x_scale, w_q, w_scale, bias, out_dtype, active_isa(), /*gelu=*/false);
}

at::Tensor int8_linear_gelu_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                                const at::Tensor& w_scale, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "int8_linear_gelu_cpu";
  const Isa isa = active_isa();
  if (has_avx512(isa)) return linear(op, x_q, x_scale, w_q, w_scale, bias, at::kFloat, isa, /*gelu=*/true);
  const at::Tensor out = linear(op, x_q, x_scale, w_q, w_scale, bias, at::kFloat, isa, /*gelu=*/false);
  const TorchThreads threads;
  return at::gelu(out);
}

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("int8_linear_cpu(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias, "
        "ScalarType out_dtype) -> Tensor");
  m.def("int8_linear_gelu_cpu(Tensor x_q, Tensor x_scale, Tensor w_q, Tensor w_scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(qbert, CPU, m) {
  m.impl("int8_linear_cpu", &int8_linear_cpu);
  m.impl("int8_linear_gelu_cpu", &int8_linear_gelu_cpu);
}

}  // namespace qbert::cpu
