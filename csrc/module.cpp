// The Python module qbert._C: importing it registers every C++ op (TORCH_LIBRARY blocks in csrc/cpu and
// csrc/cuda) and exposes what this build contains.
#include <torch/extension.h>

#include <string>
#include <vector>

#include "cpu/isa.h"
#include "cpu/weight_cache.h"
#include "cpu/parallel.h"

#ifndef QBERT_WITH_CUDA
#define QBERT_WITH_CUDA 0
#endif
#ifndef QBERT_CUDA_ARCHS
#define QBERT_CUDA_ARCHS ""  // semicolon-separated, e.g. "8.0;9.0a" (setup.py sets it in CUDA builds)
#endif

// The backend ops live in the qbert namespace beside the public ones defined in Python:
// qbert::<op>_cpu, qbert::<op>_cuda.
TORCH_LIBRARY_FRAGMENT(qbert, m) {}

PYBIND11_MODULE(_C, m) {
  m.doc() = "qbert C++/CUDA kernels";
  m.def("build_info", [] {
    pybind11::dict info;
    info["with_cuda"] = bool(QBERT_WITH_CUDA);
    info["cuda_archs"] = std::string(QBERT_CUDA_ARCHS);
    info["torch"] = TORCH_VERSION;
#if defined(__clang__)
    info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    info["compiler"] = std::string("gcc ") + __VERSION__;
#endif
    return info;
  });
  m.def("cpu_isa", [] { return std::string(qbert::cpu::isa_name(qbert::cpu::active_isa())); },
        "the int8 instruction set the cpu backend uses now: the best this CPU offers, unless set_cpu_isa "
        "forced another");
  m.def("cpu_isas", [] {
    std::vector<std::string> names;
    for (int i = 0; i < qbert::cpu::kNumIsas; ++i) {
      const auto isa = static_cast<qbert::cpu::Isa>(i);
      if (qbert::cpu::isa_supported(isa)) names.emplace_back(qbert::cpu::isa_name(isa));
    }
    return names;
  }, "every int8 instruction set this CPU can run, slowest first");
  m.def("set_cpu_isa", [](const std::string& name) {
    if (name == "auto") return qbert::cpu::reset_isa();
    qbert::cpu::Isa isa;
    std::string known;
    for (int i = 0; i < qbert::cpu::kNumIsas; ++i)
      known += std::string(i ? ", " : "") + qbert::cpu::isa_name(static_cast<qbert::cpu::Isa>(i));
    TORCH_CHECK_VALUE(qbert::cpu::isa_from_name(name.c_str(), &isa), "set_cpu_isa: unknown ISA '", name,
                      "'; expected 'auto' or one of ", known);
    TORCH_CHECK_VALUE(qbert::cpu::isa_supported(isa), "set_cpu_isa: this CPU cannot run '", name,
                      "' (its best is '", qbert::cpu::isa_name(qbert::cpu::detect_isa()), "')");
    qbert::cpu::force_isa(isa);
  }, pybind11::arg("name"),
        "force the cpu backend onto one instruction set (for tests and benchmarks); 'auto' restores the best");
  m.def("set_serial_torch", &qbert::cpu::set_serial_torch, pybind11::arg("on"),
        "on this thread: torch's own ops serial (true) while qbert's kernels keep torch's thread count, or "
        "back to normal (false); returns the previous setting (cpu/parallel.h)");
  m.def("clear_weight_cache", &qbert::cpu::clear_weight_cache,
        "drop the packed copies of int8 weights the AMX kernels keep (cpu/weight_cache.h); returns how many "
        "there were. Needed only after writing a weight through .data, .numpy() or its raw storage");
}
