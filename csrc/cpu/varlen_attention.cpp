// varlen_attention_cpu: softmax(scale * Q K^T) V per sequence and head over sequences packed row by row.
// Spec: qbert/ops/varlen_attention.py::varlen_attention_reference (torch's scaled_dot_product_attention per
// sequence). q, k, v, out: float32 [T, A], A = heads * d, sequence b's rows are [start_b, start_b + L_b).
//
// AVX-512 path (d a multiple of 16). The work is (sequence, head, query chunk) tasks, split over the threads
// by cost (query rows x keys), so that a batch of short texts beside a long one stays balanced. A task packs
// its head's K^T once ([d][L16] in a thread-local buffer, L16 = L rounded up to 16 keys), then per block
// of kRows query rows:
//   scores s[r][j] = scale * sum_c q[r][c] k[j][c]   kRows x 32-key tiles, q broadcast, K^T rows loaded
//   p[r][j]        = exp(s[r][j] - max_j s[r][j])    in place, exp from a degree-6 polynomial (~1 ulp)
//   out[r][:]      = (sum_j p[r][j] v[j][:]) / sum_j p[r][j]
// All in float32 with FMA: the same math as torch's kernel in another summation order (same-math tier).
// Scores live in a kRows x L16 buffer (L1/L2 sized for BERT's L <= 512), so no online rescaling is needed.
// Without AVX-512 (or with d not a multiple of 16) each sequence is one call of torch's
// scaled_dot_product_attention, which is the reference itself.
#include <ATen/ATen.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "common/checks.h"
#include "cpu/isa.h"
#include "cpu/ops.h"
#include "cpu/parallel.h"

namespace qbert::cpu {
namespace {

#define QBERT_AVX512F __attribute__((target("avx512f,avx512bw,avx512vl")))

constexpr int kLanes = 16;       // float lanes of a zmm
constexpr int kRows = 8;         // query rows per block: 8 x 2 score accumulators, 4 x 4 context ones
constexpr int kScoreVecs = 2;    // keys per score tile: 2 zmm
constexpr int kPvRows = 4;       // query rows per context tile
constexpr int kPvVecs = 4;       // head dims per context tile: 4 zmm (64)
// Tasks per thread to aim for when splitting a head's queries into chunks: enough to balance the split.
constexpr int64_t kTasksPerThread = 4;

// ---- exp for x <= 0 (softmax arguments after the max is subtracted) --------------------------------
// exp(x) = 2^n * e^r, n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2] (ln 2 split in two parts so
// n ln 2 is exact to float precision); e^r by Cephes' expf polynomial. Below kExpMin the result is 0.
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpMin = -87.3365447f;  // ln(FLT_MIN): below it e^x is subnormal; flushed to 0
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};

QBERT_AVX512F inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMin), _CMP_LT_OQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpPoly[i]));
  const __m512 r2 = _mm512_mul_ps(r, r);
  p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_scalef_ps(static_cast<__mmask16>(~tiny), p, n);
}

struct Head {
  const float* q;  // row 0 of this sequence, column 0 of this head; rows `ld` floats apart
  const float* k;
  const float* v;
  float* out;
  int64_t ld;
  int64_t len;  // keys (and queries) of the sequence
  int64_t d;
  float scale;
};

// kt[c][j] = k[j][c] for j < len; keys len .. L16 are 0 (their scores are never read).
QBERT_AVX512F void pack_kt(const Head& h, int64_t l16, float* kt) {
  for (int64_t j = 0; j < h.len; ++j) {
    const float* row = h.k + j * h.ld;
    for (int64_t c = 0; c < h.d; ++c) kt[c * l16 + j] = row[c];
  }
  for (int64_t c = 0; c < h.d; ++c)
    for (int64_t j = h.len; j < l16; ++j) kt[c * l16 + j] = 0.0f;
}

// s[r][j0 .. j0 + 16 NV) for the MR query rows at q (MR <= kRows), keys from kt.
template <int MR, int NV>
QBERT_AVX512F inline void score_tile(const Head& h, const float* q, const float* kt, int64_t l16, int64_t j0,
                                     float* s) {
  __m512 acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t c = 0; c < h.d; ++c) {
    __m512 kv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) kv[v] = _mm512_loadu_ps(kt + c * l16 + j0 + v * kLanes);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 qv = _mm512_set1_ps(q[r * h.ld + c]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(qv, kv[v], acc[r][v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(h.scale);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(s + r * l16 + j0 + v * kLanes, _mm512_mul_ps(acc[r][v], scale));
}

template <int MR>
QBERT_AVX512F void scores(const Head& h, const float* q, const float* kt, int64_t l16, float* s) {
  int64_t j0 = 0;
  for (; j0 + kScoreVecs * kLanes <= l16; j0 += kScoreVecs * kLanes) score_tile<MR, kScoreVecs>(h, q, kt, l16, j0, s);
  if (j0 < l16) score_tile<MR, 1>(h, q, kt, l16, j0, s);
}

// In place: s[j] = exp(s[j] - max) for j < len; returns 1 / sum_j.
QBERT_AVX512F float softmax_row(float* s, int64_t len) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  int64_t j = 0;
  for (; j + kLanes <= len; j += kLanes) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
  const __mmask16 tail = static_cast<__mmask16>((1u << (len - j)) - 1);
  if (j < len) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_maskz_loadu_ps(tail, s + j));
  const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
  __m512 sum = _mm512_setzero_ps();
  for (j = 0; j + kLanes <= len; j += kLanes) {
    const __m512 p = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + j), m));
    _mm512_storeu_ps(s + j, p);
    sum = _mm512_add_ps(sum, p);
  }
  if (j < len) {
    const __m512 p = _mm512_maskz_mov_ps(tail, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + j), m)));
    _mm512_mask_storeu_ps(s + j, tail, p);
    sum = _mm512_add_ps(sum, p);
  }
  return 1.0f / _mm512_reduce_add_ps(sum);
}

// out[r][c0 .. c0 + 16 NV) = inv[r] * sum_j p[r][j] v[j][c0 ..] for MR rows.
template <int MR, int NV>
QBERT_AVX512F inline void context_tile(const Head& h, const float* p, int64_t l16, const float* inv, int64_t c0,
                                       float* out) {
  __m512 acc[MR][NV];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  const float* vrow = h.v + c0;
  for (int64_t j = 0; j < h.len; ++j, vrow += h.ld) {
    __m512 vv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vv[v] = _mm512_loadu_ps(vrow + v * kLanes);
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m512 pr = _mm512_set1_ps(p[r * l16 + j]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(pr, vv[v], acc[r][v]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    const __m512 w = _mm512_set1_ps(inv[r]);
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * h.ld + c0 + v * kLanes, _mm512_mul_ps(acc[r][v], w));
  }
}

template <int MR>
QBERT_AVX512F void context_rows(const Head& h, const float* p, int64_t l16, const float* inv, float* out) {
  int64_t c0 = 0;
  for (; c0 + kPvVecs * kLanes <= h.d; c0 += kPvVecs * kLanes) context_tile<MR, kPvVecs>(h, p, l16, inv, c0, out);
  switch ((h.d - c0) / kLanes) {
    case 3: return context_tile<MR, 3>(h, p, l16, inv, c0, out);
    case 2: return context_tile<MR, 2>(h, p, l16, inv, c0, out);
    case 1: return context_tile<MR, 1>(h, p, l16, inv, c0, out);
    default: return;
  }
}

template <int MR>
QBERT_AVX512F void context(const Head& h, const float* p, int64_t l16, const float* inv, float* out, int rows) {
  if constexpr (MR > 1) {
    if (rows < MR) return context<MR - 1>(h, p, l16, inv, out, rows);
  }
  context_rows<MR>(h, p, l16, inv, out);
}

template <int MR = kRows>
QBERT_AVX512F void block_scores(const Head& h, const float* q, const float* kt, int64_t l16, float* s, int rows) {
  if constexpr (MR > 1) {
    if (rows < MR) return block_scores<MR - 1>(h, q, kt, l16, s, rows);
  }
  scores<MR>(h, q, kt, l16, s);
}

// Query rows [q0, q1) of one head.
QBERT_AVX512F void head_chunk(const Head& h, int64_t q0, int64_t q1, std::vector<float>& kt, std::vector<float>& s) {
  const int64_t l16 = (h.len + kLanes - 1) / kLanes * kLanes;
  kt.resize(std::max<size_t>(kt.size(), h.d * l16));
  s.resize(std::max<size_t>(s.size(), kRows * l16));
  pack_kt(h, l16, kt.data());
  float inv[kRows];
  for (int64_t r0 = q0; r0 < q1; r0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, q1 - r0));
    block_scores(h, h.q + r0 * h.ld, kt.data(), l16, s.data(), rows);
    for (int r = 0; r < rows; ++r) inv[r] = softmax_row(s.data() + r * l16, h.len);
    for (int r = 0; r < rows; r += kPvRows) {
      const int n = std::min(kPvRows, rows - r);
      context<kPvRows>(h, s.data() + r * l16, l16, inv + r, h.out + (r0 + r) * h.ld, n);
    }
  }
}

struct Task {
  int64_t start, len, head, q0, q1;
};

void run_avx512(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths, int64_t heads, double scaling) {
  const int64_t width = q.size(1), d = width / heads;
  const int64_t threads = num_threads();
  int64_t pairs = 0;
  for (const int64_t len : lengths) pairs += len > 0 ? heads : 0;
  if (pairs == 0) return;  // every sequence is empty: out has no rows
  // Split each head's queries into `chunks` when the (sequence, head) pairs alone are too few to balance.
  const int64_t chunks = pairs >= kTasksPerThread * threads ? 1 : (kTasksPerThread * threads + pairs - 1) / pairs;
  std::vector<Task> tasks;
  std::vector<int64_t> cost{0};  // prefix sums of query rows x keys
  for (size_t b = 0; b < lengths.size(); ++b) {
    const int64_t len = lengths[b];
    if (len == 0) continue;
    const int64_t step = std::max<int64_t>(kRows, (len + chunks - 1) / chunks / kRows * kRows);
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t q0 = 0; q0 < len; q0 += step) {
        tasks.push_back({starts[b], len, h, q0, std::min(len, q0 + step)});
        cost.push_back(cost.back() + (tasks.back().q1 - q0) * len);
      }
  }
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t parts = std::min<int64_t>(threads, static_cast<int64_t>(tasks.size()));
  parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    thread_local std::vector<float> kt, s;
    // Part p takes the tasks whose cost prefix falls in [p, p + 1) / parts of the total.
    const auto first = [&](int64_t p) {
      return std::lower_bound(cost.begin(), cost.end() - 1, cost.back() * p / parts) - cost.begin();
    };
    for (int64_t t = first(p0), end = first(p1); t < end; ++t) {
      const Task& task = tasks[t];
      const int64_t off = task.start * width + task.head * d;
      const Head h{qp + off, kp + off, vp + off, op + off, width, task.len, d, static_cast<float>(scaling)};
      head_chunk(h, task.q0, task.q1, kt, s);
    }
  });
}

void run_sdpa(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
              const std::vector<int64_t>& starts, const std::vector<int64_t>& lengths, int64_t heads, double scaling) {
  const int64_t d = q.size(1) / heads;
  const TorchThreads threads;
  for (size_t b = 0; b < lengths.size(); ++b) {
    if (lengths[b] == 0) continue;
    const auto heads_view = [&](const at::Tensor& t) {
      return t.narrow(0, starts[b], lengths[b]).view({1, lengths[b], heads, d}).transpose(1, 2);
    };
    heads_view(out).copy_(at::scaled_dot_product_attention(heads_view(q), heads_view(k), heads_view(v), std::nullopt,
                                                           /*dropout_p=*/0.0, /*is_causal=*/false, scaling));
  }
}

}  // namespace

at::Tensor varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& lengths, int64_t heads, double scaling) {
  constexpr const char* op = "varlen_attention_cpu";
  for (const at::Tensor* t : {&q, &k, &v}) {
    QBERT_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->dim() == 2 && t->is_contiguous(), op,
                "q, k and v must be contiguous 2-D float32 CPU tensors, got ", t->scalar_type(), " ", t->sizes(),
                " on ", t->device());
    QBERT_CHECK(t->sizes() == q.sizes(), op, "q, k and v must have one shape, got ", q.sizes(), " and ", t->sizes());
  }
  QBERT_CHECK_CPU(lengths, op);
  QBERT_CHECK_DTYPE(lengths, at::kLong, op);
  QBERT_CHECK_DIM(lengths, 1, op);
  QBERT_CHECK(heads >= 1 && q.size(1) % heads == 0, op, "heads (", heads, ") must divide the width ", q.size(1));
  const at::Tensor lens = lengths.contiguous();
  const int64_t* lp = lens.data_ptr<int64_t>();
  std::vector<int64_t> starts(lens.numel()), len(lp, lp + lens.numel());
  int64_t total = 0;
  for (size_t b = 0; b < len.size(); ++b) {
    QBERT_CHECK(len[b] >= 0, op, "lengths must be non-negative, got ", len[b], " at ", b);
    starts[b] = total;
    total += len[b];
  }
  QBERT_CHECK(total == q.size(0), op, "lengths must sum to the rows of q (", q.size(0), "), got ", total);
  at::Tensor out = at::empty_like(q);
  const int64_t d = q.size(1) / heads;
  if (has_avx512(active_isa()) && d % kLanes == 0)
    run_avx512(q, k, v, out, starts, len, heads, scaling);
  else
    run_sdpa(q, k, v, out, starts, len, heads, scaling);
  return out;
}

TORCH_LIBRARY_FRAGMENT(qbert, m) {
  m.def("varlen_attention_cpu(Tensor q, Tensor k, Tensor v, Tensor lengths, int heads, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(qbert, CPU, m) { m.impl("varlen_attention_cpu", &varlen_attention_cpu); }

}  // namespace qbert::cpu
