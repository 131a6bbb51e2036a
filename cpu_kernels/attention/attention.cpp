#include "cpu_kernels/attention/attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels/float_kernels.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {
namespace {

void check_finite(const char* arg, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i]))
      throw std::invalid_argument(std::string(arg) + ": holds NaN or Inf (element " +
                                  std::to_string(i) + ")");
}

// Key positions a query at position qp of row b may see: [begin, end).
KeyRange visible_keys(const AttentionProblem& p, int64_t qp) {
  if (qp < 0) return {0, 0};  // padding query: sees nothing, outputs zeros
  const int64_t begin = p.sliding_window > 0 ? std::max<int64_t>(0, qp - p.sliding_window + 1) : 0;
  return {begin, qp + 1};
}

// How the problem is cut into independent work items: each query (row, token) is split into
// head chunks (each head reads its KV group; all groups of a token lie together, so a chunk
// of every head streams the cache front to back) and key splits (partials merged afterwards).
// Head chunks follow the step's size (a head's result does not depend on its chunk); key
// splits cut the key positions (cached or new) at fixed multiples of split_keys, so where a
// query's keys split (and so its float result) depends on that query's own position alone,
// never on how many queries or context pages the step has, nor on how many of its keys are
// cached. Splits past a query's position are empty and merge as nothing.
// Few queries (decode) make each (query, head chunk, split) a work item and merge the splits
// after; many make each (query, head chunk) an item that folds its splits one after another
// and merges them itself, so no step holds every split's partial at once. Both merge the same
// partials in the same order.
struct Plan {
  int64_t head_chunks, heads_per_chunk, key_splits, split_keys;
  bool split_items;
  int64_t items_per_query() const { return head_chunks * (split_items ? key_splits : 1); }
};

// Key positions per key split: a multiple of the page size, so splits cut no page run.
constexpr int64_t kSplitKeys = 256;

Plan make_plan(const AttentionProblem& p) {
  const int64_t queries = p.batch * p.tokens;
  const int64_t want = 2 * static_cast<int64_t>(num_threads());
  const int64_t need = (want + queries - 1) / queries;
  // Head chunks of at least 8 heads: fewer would re-read the keys for too little work.
  const int64_t chunks = std::max<int64_t>(1, std::min(need, p.heads / 8));
  const int64_t per_chunk = (p.heads + chunks - 1) / chunks;
  const int64_t head_chunks = (p.heads + per_chunk - 1) / per_chunk;
  const int64_t split_keys = (kSplitKeys + p.page_size - 1) / p.page_size * p.page_size;
  int64_t last = 0;  // the furthest query position
  for (int64_t i = 0; i < queries; ++i) last = std::max<int64_t>(last, p.positions[i]);
  const int64_t splits = last / split_keys + 1;
  return {head_chunks, per_chunk, splits, split_keys, queries * head_chunks < want};
}

// Key split s of query bt: its visible key positions inside [s, s + 1) * split_keys.
KeyRange split_range(const AttentionProblem& p, const Plan& plan, int64_t bt, int64_t s) {
  const KeyRange keys = visible_keys(p, p.positions[bt]);
  const int64_t begin = std::max(keys.begin, s * plan.split_keys);
  return {begin, std::max(begin, std::min(keys.end, (s + 1) * plan.split_keys))};
}

constexpr float kNone = -std::numeric_limits<float>::infinity();

// The key splits of heads [0, n) of a chunk (split s's partial at first + s * item_floats,
// m and l for heads_per_chunk heads, then acc) into out (head h at out + h * vd):
// out = sum_s acc_s e^(m_s - M) / (sum_s l_s e^(m_s - M) + e^(sink_h - M)), splits in order,
// M the largest m_s and sink_h; sinks: the chunk's heads' sink logits, or nullptr (none).
void merge_splits(const Plan& plan, const float* first, int64_t item_floats, int64_t n, int64_t vd,
                  const float* sinks, float* out) {
  for (int64_t h = 0; h < n; ++h, out += vd) {
    float mx = kNone;
    for (int64_t s = 0; s < plan.key_splits; ++s) mx = std::max(mx, first[s * item_floats + h]);
    std::fill(out, out + vd, 0.f);
    if (mx == kNone) continue;  // no visible key (padding query)
    float denom = 0.f;
    if (sinks) {  // the sink joins the denominator only
      mx = std::max(mx, sinks[h]);
      denom = std::exp(sinks[h] - mx);
    }
    for (int64_t s = 0; s < plan.key_splits; ++s) {
      const float* part = first + s * item_floats;
      if (part[h] == kNone) continue;
      const float w = std::exp(part[h] - mx);
      denom += part[plan.heads_per_chunk + h] * w;
      const float* acc = part + 2 * plan.heads_per_chunk + h * vd;
      for (int64_t d = 0; d < vd; ++d) out[d] += acc[d] * w;
    }
    for (int64_t d = 0; d < vd; ++d) out[d] /= denom;
  }
}

}  // namespace

void check_attention(const AttentionProblem& p) {
  if (p.kv_heads <= 0 || p.heads % p.kv_heads != 0)
    throw std::invalid_argument("k_new: " + std::to_string(p.kv_heads) +
                                " KV heads do not divide the " + std::to_string(p.heads) +
                                " query heads");
  if (p.layer < 0 || p.layer >= p.layers)
    throw std::invalid_argument("layer: index " + std::to_string(p.layer) + " outside the " +
                                std::to_string(p.layers) + " cached layers");
  if (p.page_size <= 0) throw std::invalid_argument("k_cache: page size must be positive");
  for (int64_t b = 0; b < p.batch; ++b) {
    if (p.cache_lens[b] < 0)
      throw std::invalid_argument("cache_lens: row " + std::to_string(b) + " is negative");
    const int64_t cached = std::min<int64_t>(p.cache_lens[b], p.table_pages * p.page_size);
    const int64_t used = (cached + p.page_size - 1) / p.page_size;
    for (int64_t i = 0; i < used; ++i) {
      const int32_t page = p.block_tables[b * p.table_pages + i];
      if (page < 0 || page >= p.pages)
        throw std::invalid_argument("block_tables: row " + std::to_string(b) + " entry " +
                                    std::to_string(i) + " names page " + std::to_string(page) +
                                    ", outside the cache's " + std::to_string(p.pages) +
                                    " pages");
    }
  }
  const int64_t q_tokens = p.batch * p.tokens;
  check_finite("q", p.q, q_tokens * p.heads * p.head_dim);
  check_finite("k_new", p.k_new, q_tokens * p.kv_heads * p.head_dim);
  if (!p.values_in_keys) check_finite("v_new", p.v_new, q_tokens * p.kv_heads * p.value_dim);
  if (p.sinks) check_finite("sinks", p.sinks, p.heads);
}

void paged_attention(const AttentionProblem& p, Isa isa) {
  check_attention(p);
  const FloatKernels& kern = float_kernels(isa);
  const Plan plan = make_plan(p);
  const int64_t vd = p.value_dim, queries = p.batch * p.tokens;
  const int64_t items = queries * plan.items_per_query();
  // Per split: m and l for the chunk's heads, then acc [heads, vd].
  const int64_t item_floats = plan.heads_per_chunk * (2 + vd);
  thread_local std::vector<float> partials;
  if (plan.split_items) partials.resize(static_cast<size_t>(items * item_floats));
  float* parts = partials.data();

  // Split s of query bt, heads [h0, h0 + n), into part; an empty split is marked so.
  auto fold = [&](int64_t bt, int64_t s, int64_t h0, int64_t n, float* part) {
    const KeyRange keys = split_range(p, plan, bt, s);
    if (keys.begin == keys.end) {
      std::fill(part, part + n, kNone);
      return;
    }
    kern.attend(p, bt / p.tokens, bt % p.tokens, h0, n, keys,
                Partial{part, part + plan.heads_per_chunk, part + 2 * plan.heads_per_chunk});
  };
  auto run = [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> own;  // one (query, head chunk)'s splits
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t bt = item / plan.items_per_query();
      const int64_t rest = item % plan.items_per_query();
      const int64_t chunk = plan.split_items ? rest / plan.key_splits : rest;
      const int64_t h0 = chunk * plan.heads_per_chunk;
      const int64_t n = std::min(plan.heads_per_chunk, p.heads - h0);
      if (plan.split_items) {
        fold(bt, rest % plan.key_splits, h0, n, parts + item * item_floats);
        continue;
      }
      own.resize(static_cast<size_t>(plan.key_splits * item_floats));
      for (int64_t s = 0; s < plan.key_splits; ++s) fold(bt, s, h0, n, own.data() + s * item_floats);
      merge_splits(plan, own.data(), item_floats, n, vd, p.sinks ? p.sinks + h0 : nullptr,
                   p.out + (bt * p.heads + h0) * vd);
    }
  };
  // Below ~32K multiply-adds a pool wake-up costs more than it saves.
  const int64_t work = queries * p.heads * (p.table_pages * p.page_size + p.tokens) * p.head_dim;
  if (work < (int64_t{1} << 15)) run(0, items);
  else parallel_for(items, run);
  if (!plan.split_items) return;
  for (int64_t bt = 0; bt < queries; ++bt)
    for (int64_t chunk = 0; chunk < plan.head_chunks; ++chunk) {
      const int64_t h0 = chunk * plan.heads_per_chunk;
      merge_splits(plan, parts + (bt * plan.items_per_query() + chunk * plan.key_splits) * item_floats,
                   item_floats, std::min(plan.heads_per_chunk, p.heads - h0), vd,
                   p.sinks ? p.sinks + h0 : nullptr, p.out + (bt * p.heads + h0) * vd);
    }
}

}  // namespace ktjax
