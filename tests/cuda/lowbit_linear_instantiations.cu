// Every kernel of csrc/cuda/lowbit_linear, instantiated through its torch-free launch functions (the
// same entry points lowbit_linear.cu calls), for tests/cuda/test_nvcc_lowbit.py to compile with nvcc
// and inspect (ptxas spill report, SASS). Not part of the build. W4A8's activation quantizer is
// row_quantize's kernel (tests/cuda/row_quantize_instantiations.cu).
#include "cuda/lowbit_linear/lowbit_linear_kernel.cuh"

namespace qbert::cuda::lowbit {

template cudaError_t launch_lowbit_a16<float>(const Params&, int, Path, cudaStream_t);
template cudaError_t launch_lowbit_a16<__half>(const Params&, int, Path, cudaStream_t);
template cudaError_t launch_lowbit_a16<__nv_bfloat16>(const Params&, int, Path, cudaStream_t);
template cudaError_t launch_lowbit_a8<float>(const Params&, int, Path, cudaStream_t);
template cudaError_t launch_lowbit_a8<__half>(const Params&, int, Path, cudaStream_t);
template cudaError_t launch_lowbit_a8<__nv_bfloat16>(const Params&, int, Path, cudaStream_t);

}  // namespace qbert::cuda::lowbit
