// Every kernel of csrc/cuda/int8_gemm, instantiated through the torch-free dispatch launch_int8_gemm (the
// entry point int8_gemm.cu calls) for each output kind x activation the launcher can ask for, so that
// tests/cuda/test_nvcc_int8_gemm.py can compile them with nvcc and inspect them (ptxas spill report,
// SASS). Not part of the build.
#include "cuda/int8_gemm/int8_gemm_kernel.cuh"

namespace qbert::cuda::int8 {

template cudaError_t launch_int8_gemm<OutKind::kI32, Act::kNone>(const GemmParams&, const Plan&, cudaStream_t);
template cudaError_t launch_int8_gemm<OutKind::kF32, Act::kNone>(const GemmParams&, const Plan&, cudaStream_t);
template cudaError_t launch_int8_gemm<OutKind::kF32, Act::kGelu>(const GemmParams&, const Plan&, cudaStream_t);
template cudaError_t launch_int8_gemm<OutKind::kF16, Act::kNone>(const GemmParams&, const Plan&, cudaStream_t);
template cudaError_t launch_int8_gemm<OutKind::kF16, Act::kGelu>(const GemmParams&, const Plan&, cudaStream_t);
template cudaError_t launch_int8_gemm<OutKind::kBF16, Act::kNone>(const GemmParams&, const Plan&, cudaStream_t);
template cudaError_t launch_int8_gemm<OutKind::kBF16, Act::kGelu>(const GemmParams&, const Plan&, cudaStream_t);
template cudaError_t launch_int8_gemm<OutKind::kS8, Act::kNone>(const GemmParams&, const Plan&, cudaStream_t);
template cudaError_t launch_int8_gemm<OutKind::kS8, Act::kGelu>(const GemmParams&, const Plan&, cudaStream_t);

}  // namespace qbert::cuda::int8
