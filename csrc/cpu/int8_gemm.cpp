// int8_gemm_cpu: a int8 [M, K], b int8 [N, K] -> c int32 [M, N] = a @ b.T, exact for every int8 value
// (-128 included) and K <= 131071. Spec: qbert/ops/int8_gemm.py::int8_gemm_reference. The kernels and
// their blocking are in gemm_driver.cpp; the epilogue here only stores the int32 tile.
#include "common/checks.h"
#include "cpu/gemm_driver.h"

namespace qbert::cpu {

at::Tensor int8_gemm_cpu(const at::Tensor& a, const at::Tensor& b) {
  constexpr const char* op = "int8_gemm_cpu";
  QBERT_CHECK_CPU(a, op);
  QBERT_CHECK_CPU(b, op);
  QBERT_CHECK_DTYPE(a, at::kChar, op);
  QBERT_CHECK_DTYPE(b, at::kChar, op);
  QBERT_CHECK_DIM(a, 2, op);
  QBERT_CHECK_DIM(b, 2, op);
  QBERT_CHECK_CONTIGUOUS(a, op);
  QBERT_CHECK_CONTIGUOUS(b, op);
  QBERT_CHECK(a.size(1) == b.size(1), op, "K mismatch: a is ", a.sizes(), ", b is ", b.sizes());
  QBERT_CHECK(a.size(1) >= 1 && a.size(1) <= kInt8GemmMaxK, op, "K must be in [1, ", kInt8GemmMaxK,
              "] (beyond it an int32 accumulator can overflow), got a of shape ", a.sizes());
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kInt));
  Epilogue epi;
  epi.out = c.data_ptr<int32_t>();
  epi.out_kind = OutKind::kI32;
  epi.ldo = N;
  int8_gemm_fused(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), M, N, K, epi, active_isa());
  return c;
}

TORCH_LIBRARY_FRAGMENT(qbert, m) { m.def("int8_gemm_cpu(Tensor a, Tensor b) -> Tensor"); }

TORCH_LIBRARY_IMPL(qbert, CPU, m) { m.impl("int8_gemm_cpu", &int8_gemm_cpu); }

}  // namespace qbert::cpu
