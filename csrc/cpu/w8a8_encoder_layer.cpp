// w8a8_encoder_layer_cpu: one BERT-family encoder layer of the fused W8A8 chain (qbert/nn/fused.py) in one
// call. Spec: qbert/ops/w8a8_encoder_layer.py::w8a8_encoder_layer_reference, whose qbert ops on the cpu
// backend run the same kernels in the same order on the same operands, so its results are those bits. What
// it saves is the Python and dispatch of the ~10 op calls and ~10 module calls of a layer (~0.4 ms a layer
// measured at tiny shapes), and on padded batches the attention over pad positions; its attention is
// qbert's varlen_attention kernel wherever the rows of a sequence attend to each other alone.
//
//   codes     = (x_q, x_scale), or quantize_per_token(x) when none are given
//   q, k, v   = int8_linear(codes, W_q | W_k | W_v)                                   [R, A] f32
//   context   = unpadded (indices, R = T real tokens): varlen_attention(q, k, v, L) with L_b the real tokens
//                 of sequence b (its rows are consecutive, as the indices ascend)
//               padded (no indices, R = B * S), no mask: varlen_attention(q, k, v, [S] * B)
//               padded with a mask: [B, S, A] -> [B, heads, S, d] ->
//                 scaled_dot_product_attention(q, k, v, mask, scale=scaling) -> [B, S, A] -> [R, A]
//   a, a_codes = add_layernorm_quantize(w8a8_linear(context, W_o), x, LN_1)
//   h_codes   = quantize_per_token(int8_linear_gelu(a_codes, W_1))
//   y, y_codes = add_layernorm_quantize(int8_linear(h_codes, W_2), a, LN_2)        -> (y, y_q, y_scale)
// A = heads * head size d (the hidden size H unless heads were pruned). `indices`: the real tokens'
// positions in the flattened [B * S], ascending (qbert/nn/unpad.py); the mask is then plain key padding, so
// each real query attends to exactly the real keys of its sequence, which is what varlen_attention computes
// (the same math as the padded call, not its bits).
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include <optional>
#include <tuple>
#include <vector>

#include "common/checks.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"

namespace qbert::cpu {
namespace {

// The order of `params` (qbert/ops/w8a8_encoder_layer.py::PARAMS names them).
enum Param : int64_t {
  kQueryW, kQueryScale, kQueryBias, kKeyW, kKeyScale, kKeyBias, kValueW, kValueScale, kValueBias,
  kOutW, kOutScale, kOutBias, kNorm1W, kNorm1B,
  kUpW, kUpScale, kUpBias, kDownW, kDownScale, kDownBias, kNorm2W, kNorm2B,
  kNumParams
};

// A kernel call as a profiler range under the kernel's registered name, so that torch.profiler (the profile
// benchmark suite) attributes its time as it does in the op-by-op chain; next to free with no profiler on.
template <class Fn, class... Args>
auto recorded(const char* name, Fn fn, const Args&... args) {
  RECORD_FUNCTION(name, std::vector<c10::IValue>());
  return fn(args...);
}

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
    std::tie(codes_q, codes_scale) = recorded("qbert::quantize_per_token_cpu", quantize_per_token_cpu, x);
  }
  const auto project = [&](Param w) {
    return recorded("qbert::int8_linear_cpu", int8_linear_cpu, codes_q, codes_scale, p(w),
                    p(static_cast<Param>(w + 1)), opt(static_cast<Param>(w + 2)),
                           at::kFloat);
  };
  at::Tensor context;
  if (indices || !attention_mask) {
    // Rows of one sequence are consecutive: unpadded, sequence b's L_b real tokens (indices ascend);
    // padded with no mask, every sequence's S rows. varlen_attention attends within each.
    const at::Tensor q = project(kQueryW), k = project(kKeyW), v = project(kValueW);
    QBERT_CHECK(q.size(1) % heads == 0, op, "heads (", heads, ") must divide the attention width ", q.size(1));
    at::Tensor lengths = at::full({batch}, seq, at::kLong);
    if (indices) {
      const at::Tensor idx = indices->contiguous();
      const int64_t* pos = idx.data_ptr<int64_t>();
      int64_t* length = lengths.zero_().data_ptr<int64_t>();
      for (int64_t r = 0; r < rows; ++r) {
        QBERT_CHECK(pos[r] >= 0 && pos[r] < batch * seq && (r == 0 || pos[r] > pos[r - 1]), op,
                    "indices must ascend strictly within [0, batch * seq = ", batch * seq, "), got ", pos[r],
                    " at row ", r);
        ++length[pos[r] / seq];
      }
    }
    context = recorded("qbert::varlen_attention_cpu", varlen_attention_cpu, q, k, v, lengths, heads, scaling);
  } else {
    // [B * S, A] -> [B, heads, S, A / heads], as FusedSelfAttention shapes them (a view of [B, S, heads, d]);
    // A = heads * d, the hidden size unless heads were pruned.
    const auto heads_view = [&](const at::Tensor& t) {
      const int64_t width = t.size(1);
      QBERT_CHECK(width % heads == 0, op, "heads (", heads, ") must divide the attention width ", width);
      return t.view({batch, seq, heads, width / heads}).transpose(1, 2);
    };
    const at::Tensor q = heads_view(project(kQueryW)), k = heads_view(project(kKeyW)),
                     v = heads_view(project(kValueW));
    const TorchThreads threads;
    context = at::scaled_dot_product_attention(q, k, v, attention_mask, /*dropout_p=*/0.0, /*is_causal=*/false,
                                               scaling);
    context = context.transpose(1, 2).contiguous().view({batch * seq, -1});
  }

  // The attention output's dense from float input: w8a8_linear's cpu row.
  const auto [ctx_q, ctx_scale] = recorded("qbert::quantize_per_token_cpu", quantize_per_token_cpu, context);
  const at::Tensor o = recorded("qbert::int8_linear_cpu", int8_linear_cpu, ctx_q, ctx_scale, p(kOutW), p(kOutScale),
                                opt(kOutBias), at::kFloat);
  const auto [a, a_q, a_scale] =
      recorded("qbert::add_layernorm_quantize_cpu", add_layernorm_quantize_cpu, o, x, p(kNorm1W), opt(kNorm1B), eps1);
  // The FFN up-projection: int8_linear_requant's cpu row with the exact GELU (in the GEMM's epilogue on AVX-512).
  const at::Tensor up = recorded("qbert::int8_linear_gelu_cpu", int8_linear_gelu_cpu, a_q, a_scale, p(kUpW),
                                 p(kUpScale), opt(kUpBias));
  const auto [h_q, h_scale] = recorded("qbert::quantize_per_token_cpu", quantize_per_token_cpu, up);
  const at::Tensor down = recorded("qbert::int8_linear_cpu", int8_linear_cpu, h_q, h_scale, p(kDownW),
                                   p(kDownScale), opt(kDownBias), at::kFloat);
  return recorded("qbert::add_layernorm_quantize_cpu", add_layernorm_quantize_cpu, down, a, p(kNorm2W),
                  opt(kNorm2B), eps2);
}

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("w8a8_encoder_layer_cpu(Tensor x, Tensor? x_q, Tensor? x_scale, Tensor?[] params, float eps1, float eps2, "
        "int heads, float scaling, Tensor? attention_mask, Tensor? indices, int batch, int seq) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(qbert, CPU, m) { m.impl("w8a8_encoder_layer_cpu", &w8a8_encoder_layer_cpu); }

}  // namespace qbert::cpu
