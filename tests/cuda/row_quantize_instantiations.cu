// Every kernel of csrc/cuda/row_quantize, instantiated through its torch-free launch functions (the entry
// points row_quantize.cu and lowbit_linear.cu call), for tests/cuda/test_nvcc_row_quantize.py to compile
// with nvcc and inspect (ptxas spill report, SASS, PTX). Not part of the build.
#include "cuda/row_quantize/row_quantize_kernel.cuh"

namespace qbert::cuda::row_quantize {

template cudaError_t launch_row_quantize<float>(const Params&, cudaStream_t);
template cudaError_t launch_row_quantize<__half>(const Params&, cudaStream_t);
template cudaError_t launch_row_quantize<__nv_bfloat16>(const Params&, cudaStream_t);
// w4a8_linear's entry point (lowbit_linear.cu): the quantize-only kernels above, with padded rows.
template cudaError_t launch_quantize_per_token<float>(const float*, int, int, int, int8_t*, float*, cudaStream_t);
template cudaError_t launch_quantize_per_token<__half>(const __half*, int, int, int, int8_t*, float*, cudaStream_t);
template cudaError_t launch_quantize_per_token<__nv_bfloat16>(const __nv_bfloat16*, int, int, int, int8_t*, float*,
                                                              cudaStream_t);

}  // namespace qbert::cuda::row_quantize
