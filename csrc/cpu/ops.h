// The cpu launchers other cpu launchers call directly (C++ to C++, no dispatcher): each is defined, checked
// and registered as torch.ops.qbert.<name> in its own .cpp file.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace qbert::cpu {

// int8_linear.cpp
at::Tensor int8_linear_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                           at::ScalarType out_dtype);
at::Tensor int8_linear_gelu_cpu(const at::Tensor& x_q, const at::Tensor& x_scale, const at::Tensor& w_q,
                                const at::Tensor& w_scale, const std::optional<at::Tensor>& bias);

// quantize_per_token.cpp
std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu(const at::Tensor& x);

// add_layernorm_quantize.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor> add_layernorm_quantize_cpu(const at::Tensor& x,
                                                                          const std::optional<at::Tensor>& residual,
                                                                          const at::Tensor& weight,
                                                                          const std::optional<at::Tensor>& bias,
                                                                          double eps);

// varlen_attention.cpp
at::Tensor varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& lengths, int64_t heads, double scaling);

}  // namespace qbert::cpu
