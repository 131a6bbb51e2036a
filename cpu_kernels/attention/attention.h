// Paged attention on the host CPU for steps with few new tokens per row (decode): each query
// reads the cached keys and values of its layer straight from the paged cache, so nothing is
// gathered or copied per layer. The contract is ktjax/kernels/paged_attention_ref.py's.
#pragma once

#include <cstdint>

#include "cpu_kernels/isa.h"

namespace ktjax {

enum class CacheType { F32, BF16 };

// Shapes: q [B, T, H, hd]; k_new [B, T, n_kv, hd]; v_new [B, T, n_kv, vd];
// k_cache [L, n_pages, page_size, n_kv, hd]; v_cache [L, n_pages, page_size, n_kv, vd];
// block_tables [B, P]; cache_lens [B]; positions [B, T] (-1: padding); out [B, T, H, vd].
// values_in_keys (MLA): the values are the first vd dims of each key; v_new / v_cache unused.
// sinks [H] (gpt-oss, optional): a logit per head that joins each query's softmax denominator
// (e^(sink - max) added to the sum) and contributes no value.
struct AttentionProblem {
  const float* q = nullptr;
  const float* k_new = nullptr;
  const float* v_new = nullptr;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  CacheType cache_type = CacheType::F32;
  const int32_t* block_tables = nullptr;
  const int32_t* cache_lens = nullptr;
  const int32_t* positions = nullptr;
  float* out = nullptr;
  int64_t batch = 0, tokens = 0, heads = 0, kv_heads = 0, head_dim = 0, value_dim = 0;
  int64_t layer = 0, layers = 0, pages = 0, page_size = 0, table_pages = 0;
  bool values_in_keys = false;
  float scale = 1.f;
  int64_t sliding_window = 0;  // <= 0: unlimited
  const float* sinks = nullptr;  // [heads] or nullptr
};

// A contiguous run of key positions [begin, end) visible to one query: those before its
// row's cache length are in the cache, the others are the step's own keys.
struct KeyRange {
  int64_t begin, end;
};

// Online-softmax partial of a run of query heads over a key range: running max
// m, denominator l and unnormalized output acc [heads, value_dim].
struct Partial {
  float* m;
  float* l;
  float* acc;
};

// Throws std::invalid_argument naming the argument when an index would leave the buffers
// (layer, a used block-table entry, head grouping) or q / k_new / v_new / sinks hold NaN or Inf.
void check_attention(const AttentionProblem& p);

// Runs the problem on the thread pool with the kernels of `isa` (AMX machines use AVX-512).
void paged_attention(const AttentionProblem& p, Isa isa);

}  // namespace ktjax
