// Every kernel of csrc/cuda/row_quantize, instantiated through its torch-free launch function (the entry
// point row_quantize.cu calls), for tests/cuda/test_nvcc_row_quantize.py to compile with nvcc and inspect
// (ptxas spill report, SASS, PTX). Not part of the build.
#include "cuda/row_quantize/row_quantize_kernel.cuh"

namespace qbert::cuda::row_quantize {

template cudaError_t launch_row_quantize<float>(const Params&, cudaStream_t);
template cudaError_t launch_row_quantize<__half>(const Params&, cudaStream_t);
template cudaError_t launch_row_quantize<__nv_bfloat16>(const Params&, cudaStream_t);

}  // namespace qbert::cuda::row_quantize
