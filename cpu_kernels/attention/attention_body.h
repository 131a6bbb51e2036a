// The attention kernel body, written once over simd16.h's vector helpers; each ISA
// translation unit includes it and compiles it with its own flags (see simd16.h).
#pragma once

#include <cmath>
#include <algorithm>
#include <cstring>
#include <limits>

#include "cpu_kernels/attention/attention.h"
#include "cpu_kernels/simd16.h"
#include "cpu_kernels/unit_local.h"

namespace ktjax {
namespace {
namespace attention_body {

using namespace simd16;

// Keys and values of one chunk (a page run, or the step's new tokens): key i of KV group g
// at k + i * k_stride + g * head_dim, its value at v + i * v_stride + g * v_group.
template <class KT>
struct Chunk {
  const KT* k;
  const KT* v;
  int64_t k_stride, v_stride, v_group, n;
};

// Folds a chunk into the online softmax of query heads [h0, h0 + heads) (each reading its KV
// group); `visible(i)` says whether key i counts. Keys are visited in memory order, all
// groups of a token together, so the cache streams front to back.
template <class KT, class Visible>
void fold_chunk(const AttentionProblem& p, const float* q, int64_t h0, int64_t heads,
                Chunk<KT> c, Visible visible, UnitVector<float>& scores, Partial part) {
  const int64_t hd = p.head_dim, vd = p.value_dim, rep = p.heads / p.kv_heads;
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  const int64_t stride = (c.n + 15) / 16 * 16;  // whole vectors per head, padded with kNone
  scores.assign(static_cast<size_t>(heads * stride), kNone);
  for (int64_t i = 0; i < c.n; ++i) {
    if (!visible(i)) continue;
    const KT* key = c.k + i * c.k_stride;
    for (int64_t h = 0; h < heads; ++h)
      scores[h * stride + i] = dot(q + h * hd, key + (h0 + h) / rep * hd, hd) * p.scale;
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores.data() + h * stride;
    float mx = part.m[h];
    for (int64_t i = 0; i < c.n; ++i) mx = s[i] > mx ? s[i] : mx;
    if (mx == kNone) continue;  // nothing visible to this head yet
    // The running sums move to the new max (e^-inf = 0 the first time), then the chunk's
    // weights e^(s - max) (0 for invisible keys) are added.
    float* acc = part.acc + h * vd;
    if (mx != part.m[h]) {
      const float keep = part.m[h] == kNone ? 0.f : std::exp(part.m[h] - mx);
      part.l[h] *= keep;
      for (int64_t d = 0; d < vd; ++d) acc[d] *= keep;
    }
    F32x16 sum = {};
    for (int64_t i = 0; i < stride; i += 16) {
      const F32x16 w = exp_nonpositive(load16(s + i) - mx);
      store16(s + i, w);
      sum += w;
    }
    part.l[h] += hsum(sum);
    weighted_sum(acc, s, c.v + (h0 + h) / rep * c.v_group, c.v_stride, c.n, vd);
    part.m[h] = mx;
  }
}

template <class KT>
void attend_typed(const AttentionProblem& p, int64_t b, int64_t t, int64_t h0, int64_t n,
                  KeyRange keys, Partial part) {
  const int64_t hd = p.head_dim, vd = p.value_dim, kv = p.kv_heads, ps = p.page_size;
  const float* q = p.q + ((b * p.tokens + t) * p.heads + h0) * hd;
  for (int64_t h = 0; h < n; ++h) {
    part.m[h] = -std::numeric_limits<float>::infinity();
    part.l[h] = 0.f;
  }
  std::memset(part.acc, 0, sizeof(float) * static_cast<size_t>(n * vd));
  thread_local UnitVector<float> scores;
  const auto all = [](int64_t) { return true; };

  // Cached keys, one page run at a time, read in place.
  const KT* kc = static_cast<const KT*>(p.k_cache);
  const KT* vc = p.values_in_keys ? kc : static_cast<const KT*>(p.v_cache);
  const int64_t vrow = p.values_in_keys ? hd : vd;  // cache elements per token and group
  const int32_t* table = p.block_tables + b * p.table_pages;
  for (int64_t s = keys.ctx_begin; s < keys.ctx_end;) {
    const int64_t first = s % ps, count = std::min(ps - first, keys.ctx_end - s);
    const int64_t slot = (p.layer * p.pages + table[s / ps]) * ps + first;
    fold_chunk(p, q, h0, n,
               Chunk<KT>{kc + slot * kv * hd, vc + slot * kv * vrow, kv * hd, kv * vrow, vrow,
                         count},
               all, scores, part);
    s += count;
  }
  if (!keys.with_new) return;
  // The step's own keys (float32, not yet in the cache): visible when at or before the
  // query's position and inside the window.
  const int32_t* pos = p.positions + b * p.tokens;
  const int64_t qp = pos[t], window = p.sliding_window;
  const float* kn = p.k_new + b * p.tokens * kv * hd;
  const float* vn = p.values_in_keys ? kn : p.v_new + b * p.tokens * kv * vd;
  const auto visible = [&](int64_t j) {
    return pos[j] >= 0 && pos[j] <= qp && (window <= 0 || qp - pos[j] < window);
  };
  // Only up to the last visible key: the step's padding tokens would add exact zeros, so
  // the result is the same for any step size, and a prefill query skips the keys after it.
  int64_t count = p.tokens;
  while (count > 0 && !visible(count - 1)) --count;
  if (count == 0) return;
  fold_chunk(p, q, h0, n, Chunk<float>{kn, vn, kv * hd, kv * vrow, vrow, count}, visible,
             scores, part);
}

inline void attend(const AttentionProblem& p, int64_t b, int64_t t, int64_t h0, int64_t n,
                   KeyRange keys, Partial part) {
  if (p.cache_type == CacheType::BF16)
    attend_typed<uint16_t>(p, b, t, h0, n, keys, part);
  else
    attend_typed<float>(p, b, t, h0, n, keys, part);
}

}  // namespace attention_body
}  // namespace
}  // namespace ktjax
