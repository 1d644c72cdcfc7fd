// w8a8_encoder_layer_cpu: one BERT-family encoder layer of the fused W8A8 chain (qbert/nn/fused.py) in one
// call. Spec: qbert/ops/w8a8_encoder_layer.py::w8a8_encoder_layer_reference. It runs the same cpu kernels,
// in the same order and on the same operands, as the chain of per-op calls (and attention through the same
// at::scaled_dot_product_attention call as Hugging Face's sdpa implementation), so its results are those
// bits; what it saves is the Python and dispatch of the ~10 op calls and ~10 module calls of a layer
// (about 0.5 ms a layer, a sixth of BERT-base's forward at batch 1, measured).
//
//   codes     = (x_q, x_scale), or quantize_per_token(x) when none are given
//   q, k, v   = int8_linear(codes, W_q | W_k | W_v)                                   [R, A] f32
//   q, k, v   -> [B, S, A] (indices: scatter to the padded positions, zeros at the pads) -> [B, heads, S, d]
//   context   = scaled_dot_product_attention(q, k, v, mask, scale=scaling) -> [B, S, A] -> [R, A] (gather)
//   a, a_codes = add_layernorm_quantize(w8a8_linear(context, W_o), x, LN_1)
//   h_codes   = quantize_per_token(gelu(int8_linear(a_codes, W_1)))
//   y, y_codes = add_layernorm_quantize(int8_linear(h_codes, W_2), a, LN_2)        -> (y, y_q, y_scale)
// A = heads * head size (the hidden size H unless heads were pruned); R = T real tokens when `indices` (ascending positions in the flattened [B * S]) is given, else B * S.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "common/checks.h"
#include "cpu/ops.h"

namespace qbert::cpu {
namespace {

// The order of `params` (qbert/ops/w8a8_encoder_layer.py::PARAMS names them).
enum Param : int64_t {
  kQueryW, kQueryScale, kQueryBias, kKeyW, kKeyScale, kKeyBias, kValueW, kValueScale, kValueBias,
  kOutW, kOutScale, kOutBias, kNorm1W, kNorm1B,
  kUpW, kUpScale, kUpBias, kDownW, kDownScale, kDownBias, kNorm2W, kNorm2B,
  kNumParams
};

at::Tensor required(const c10::List<std::optional<at::Tensor>>& params, Param i, const char* op) {
  const std::optional<at::Tensor> t = params.get(i);
  QBERT_CHECK(t.has_value(), op, "params[", static_cast<int64_t>(i), "] (a weight, scale or LayerNorm weight) "
              "must be a tensor, got None");
  return *t;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> w8a8_encoder_layer_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& x_q, const std::optional<at::Tensor>& x_scale,
    const c10::List<std::optional<at::Tensor>>& params, double eps1, double eps2, int64_t heads, double scaling,
    const std::optional<at::Tensor>& attention_mask, const std::optional<at::Tensor>& indices, int64_t batch,
    int64_t seq) {
  constexpr const char* op = "w8a8_encoder_layer_cpu";
  QBERT_CHECK_CPU(x, op);
  QBERT_CHECK_DIM(x, 2, op);
  QBERT_CHECK_CONTIGUOUS(x, op);
  QBERT_CHECK_DTYPE(x, at::kFloat, op);
  QBERT_CHECK(static_cast<int64_t>(params.size()) == kNumParams, op, "params must hold ",
              static_cast<int64_t>(kNumParams), " entries, got ", params.size());
  QBERT_CHECK(x_q.has_value() == x_scale.has_value(), op, "x_q and x_scale go together: both or neither");
  const int64_t rows = x.size(0);
  QBERT_CHECK(heads >= 1, op, "heads must be positive, got ", heads);
  QBERT_CHECK(batch >= 1 && seq >= 1, op, "batch and seq must be positive, got ", batch, " and ", seq);
  if (indices) {
    QBERT_CHECK_DTYPE(*indices, at::kLong, op);
    QBERT_CHECK(indices->dim() == 1 && indices->size(0) == rows, op, "indices must have shape [R=", rows,
                "] (one position per row of x), got ", indices->sizes());
  } else {
    QBERT_CHECK(rows == batch * seq, op, "without indices x must have batch * seq = ", batch * seq,
                " rows, got ", rows);
  }
  const auto p = [&](Param i) { return required(params, i, op); };
  const auto opt = [&](Param i) { return params.get(i); };

  at::Tensor codes_q, codes_scale;
  if (x_q) {
    codes_q = *x_q;
    codes_scale = *x_scale;
  } else {
    std::tie(codes_q, codes_scale) = quantize_per_token_cpu(x);
  }
  const auto project = [&](Param w) {
    return int8_linear_cpu(codes_q, codes_scale, p(w), p(static_cast<Param>(w + 1)), opt(static_cast<Param>(w + 2)),
                           at::kFloat);
  };
  // [R, A] -> [B, heads, S, A / heads], as FusedSelfAttention shapes them (a view of [B, S, heads, d]);
  // A = heads * d, the hidden size unless heads were pruned.
  const auto heads_view = [&](at::Tensor t) {
    const int64_t width = t.size(1);
    QBERT_CHECK(width % heads == 0, op, "heads (", heads, ") must divide the attention width ", width);
    if (indices) t = at::zeros({batch * seq, width}, t.options()).index_copy_(0, *indices, t);
    return t.view({batch, seq, heads, width / heads}).transpose(1, 2);
  };
  const at::Tensor q = heads_view(project(kQueryW)), k = heads_view(project(kKeyW)), v = heads_view(project(kValueW));
  at::Tensor context = at::scaled_dot_product_attention(q, k, v, attention_mask, /*dropout_p=*/0.0,
                                                        /*is_causal=*/false, scaling);
  context = context.transpose(1, 2).contiguous().view({batch * seq, -1});
  context = indices ? context.index_select(0, *indices) : context;

  // The attention output's dense from float input: w8a8_linear's cpu row.
  const auto [ctx_q, ctx_scale] = quantize_per_token_cpu(context);
  const at::Tensor o = int8_linear_cpu(ctx_q, ctx_scale, p(kOutW), p(kOutScale), opt(kOutBias), at::kFloat);
  const auto [a, a_q, a_scale] = add_layernorm_quantize_cpu(o, x, p(kNorm1W), opt(kNorm1B), eps1);
  // The FFN up-projection: int8_linear_requant's cpu row with the exact GELU.
  const at::Tensor up = at::gelu(int8_linear_cpu(a_q, a_scale, p(kUpW), p(kUpScale), opt(kUpBias), at::kFloat));
  const auto [h_q, h_scale] = quantize_per_token_cpu(up);
  const at::Tensor down = int8_linear_cpu(h_q, h_scale, p(kDownW), p(kDownScale), opt(kDownBias), at::kFloat);
  return add_layernorm_quantize_cpu(down, a, p(kNorm2W), opt(kNorm2B), eps2);
}

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("w8a8_encoder_layer_cpu(Tensor x, Tensor? x_q, Tensor? x_scale, Tensor?[] params, float eps1, float eps2, "
        "int heads, float scaling, Tensor? attention_mask, Tensor? indices, int batch, int seq) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qbert, CPU, m) { m.impl("w8a8_encoder_layer_cpu", &w8a8_encoder_layer_cpu); }

}  // namespace qbert::cpu
