// The Python module qbert._C: importing it registers every C++ op (TORCH_LIBRARY blocks in csrc/cpu and
// csrc/cuda) and exposes what this build contains.
#include <torch/extension.h>

#include "cpu/isa.h"

#ifndef QBERT_WITH_CUDA
#define QBERT_WITH_CUDA 0
#endif

// The backend ops live in the qbert namespace beside the public ones defined in Python:
// qbert::<op>_cpu, qbert::<op>_cuda.
TORCH_LIBRARY_FRAGMENT(qbert, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "qbert C++/CUDA kernels";
  m.def("build_info", [] {
    pybind11::dict info;
    info["with_cuda"] = bool(QBERT_WITH_CUDA);
    info["torch"] = TORCH_VERSION;
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#endif
    return info;
  });
  m.def("cpu_isa", [] { return std::string(qbert::cpu::isa_name(qbert::cpu::detect_isa())); },
        "the best int8 instruction set this CPU offers to the cpu backend");
}
