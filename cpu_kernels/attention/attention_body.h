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

// Folds a run of keys into the online softmax of query heads [h0, h0 + heads) (each reading
// its KV group): `a`'s keys (cached), then `b`'s (the step's own, float32), all visible. Keys
// are visited in memory order, all groups of a token together, so the cache streams front to
// back. The weighted sum adds key after key, so a run split between the two sources sums
// exactly as one source would.
template <class KT>
void fold_run(const AttentionProblem& p, const float* q, int64_t h0, int64_t heads,
              Chunk<KT> a, Chunk<float> b, UnitVector<float>& scores, Partial part) {
  const int64_t hd = p.head_dim, vd = p.value_dim, rep = p.heads / p.kv_heads;
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  const int64_t n = a.n + b.n;
  const int64_t stride = (n + 15) / 16 * 16;  // whole vectors per head, padded with kNone
  scores.assign(static_cast<size_t>(heads * stride), kNone);
  for (int64_t i = 0; i < a.n; ++i) {
    const KT* key = a.k + i * a.k_stride;
    for (int64_t h = 0; h < heads; ++h)
      scores[h * stride + i] = dot(q + h * hd, key + (h0 + h) / rep * hd, hd) * p.scale;
  }
  for (int64_t i = 0; i < b.n; ++i) {
    const float* key = b.k + i * b.k_stride;
    for (int64_t h = 0; h < heads; ++h)
      scores[h * stride + a.n + i] = dot(q + h * hd, key + (h0 + h) / rep * hd, hd) * p.scale;
  }
  for (int64_t h = 0; h < heads; ++h) {
    float* s = scores.data() + h * stride;
    float mx = part.m[h];
    for (int64_t i = 0; i < n; ++i) mx = s[i] > mx ? s[i] : mx;
    if (mx == kNone) continue;  // nothing visible to this head yet
    // The running sums move to the new max (e^-inf = 0 the first time), then the run's
    // weights e^(s - max) are added.
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
    if (a.n) weighted_sum(acc, s, a.v + (h0 + h) / rep * a.v_group, a.v_stride, a.n, vd);
    if (b.n) weighted_sum(acc, s + a.n, b.v + (h0 + h) / rep * b.v_group, b.v_stride, b.n, vd);
    part.m[h] = mx;
  }
}

// Query t of row b over the key positions [keys.begin, keys.end): positions before the row's
// cache length are read from the cache in place, later ones are the step's own keys (its
// tokens hold consecutive positions from the cache length). Keys are folded in runs cut at
// multiples of the page size by position, whichever side they come from, so a query's result
// depends on its position and context alone: not on where its prompt was cut into chunks,
// on a prefix found cached, or on whether it is decoded or verified with draft tokens.
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

  const KT* kc = static_cast<const KT*>(p.k_cache);
  const KT* vc = p.values_in_keys ? kc : static_cast<const KT*>(p.v_cache);
  const int64_t vrow = p.values_in_keys ? hd : vd;  // cache elements per token and group
  const int32_t* table = p.block_tables + b * p.table_pages;
  const int64_t cache_len = p.cache_lens[b];
  const int64_t cached = std::min<int64_t>(cache_len, p.table_pages * ps);
  const float* kn = p.k_new + b * p.tokens * kv * hd;
  const float* vn = p.values_in_keys ? kn : p.v_new + b * p.tokens * kv * vd;
  for (int64_t r0 = keys.begin; r0 < keys.end;) {
    const int64_t r1 = std::min(keys.end, (r0 / ps + 1) * ps);
    const int64_t c1 = std::max(r0, std::min(r1, cached));  // cached part [r0, c1)
    const int64_t n0 = std::max(r0, cache_len);             // new part [n0, r1)
    Chunk<KT> from_cache{kc, vc, kv * hd, kv * vrow, vrow, c1 - r0};
    if (c1 > r0) {  // (a run of new keys alone may lie past the block table)
      const int64_t slot = (p.layer * p.pages + table[r0 / ps]) * ps + r0 % ps;
      from_cache.k += slot * kv * hd;
      from_cache.v += slot * kv * vrow;
    }
    const int64_t j = std::max<int64_t>(0, n0 - cache_len);
    const Chunk<float> from_step{kn + j * kv * hd, vn + j * kv * vrow, kv * hd, kv * vrow, vrow,
                                 std::max<int64_t>(0, r1 - n0)};
    fold_run(p, q, h0, n, from_cache, from_step, scores, part);
    r0 = r1;
  }
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
