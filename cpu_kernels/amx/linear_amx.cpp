// AMX linear kernels for calls with enough tokens to fill tiles (prefill, busy experts).
// Dispatched only when detected_isa() is Amx (CPUID + OS tile state + the arch_prctl
// permission requested in isa.cpp); fewer tokens go to the AVX-512 kernels.
//
// B tiles are the packed layout as is: a group record of 16 rows is a VNNI-ordered B tile
// (int8: G/4 rows of 64 bytes; bf16: 16 rows of 64 bytes = 32 k). A tiles come from the
// activations as prepare tiled them (QuantActs::tiled: one K step of 16 tokens is 1 KiB,
// contiguous); rows are padded to a multiple of 16 tokens, so tile loads stay in bounds.
//  * bf16 and int8 with Row scales: TDPBF16PS / TDPBSUD accumulate over all of K in the
//    tiles (gemm_full_k); C is scaled once at the end.
//  * int8 / int4: one tile product per group (TDPBSSD on int8 unbiased into a buffer,
//    TDPBSUD on int4 nibbles unpacked there), then the group's scales applied in AVX-512
//    registers, 16 token rows at a time, while the next group's tile product runs.
//
// Built with -DKTJAX_AMX_EMULATE (tests only), the tile instructions run in software.
#include <immintrin.h>

#ifdef KTJAX_AMX_EMULATE
#include "cpu_kernels/amx/amx_emulation.h"
#endif

#include <algorithm>
#include <vector>

#include "cpu_kernels/linear/linear.h"

namespace ktjax {
namespace {

constexpr int kAmxMinTokens = 16;

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "AMX tile configuration is 64 bytes");

void configure(int idx, int rows, int colsb, TileConfig* c) {
  c->rows[idx] = static_cast<uint8_t>(rows);
  c->colsb[idx] = static_cast<uint16_t>(colsb);
}

// Full-K kernels: bf16 (TDPBF16PS) and int8 with Row scales (TDPBSUD; one scale per row and
// per token, so all of K accumulates in int32). A K step is 64 bytes of each token row (32
// bf16 or 64 int8) against the 1 KiB B tile of a row block. Tiles 0-3 = C (token block i,
// row block j at 2i + j), 4-5 = A, 6-7 = B: a step loads 4 tiles for 4 tile products.
// Every tile load must hit L1 or L2 (a tile load that misses L2 stalls the products behind
// it), so per thread and call (one core: L1 48 KiB, L2 2 MiB):
//  * B: the call's row blocks go in slabs, a slab being some row blocks' panels over a K
//    range, at most kSlabBytes; a slab stays in L2 while every token pair passes over it,
//    so each weight byte comes from memory once per call, prefetched while the previous
//    slab computes;
//  * A: a token pair's tiles go in chunks of about kChunkSteps K steps (2 x 16 KiB) that
//    stay in L1 while the slab's row pairs use them (A is shared by the threads and comes
//    from L3 or L2 once per slab; software prefetch of it measured no gain). B tiles, used
//    once per token pair, load with the streaming hint (TILELOADDT1) so they do not evict
//    the A chunk from L1: one thread, [2048, 7168] x 1024 tokens int8_row, 1.82-1.91 TOPS
//    vs 1.63-1.71 with plain loads, interleaved in two runs. Tried and dropped (MoE,
//    DeepSeek-V3 shape, 64 experts, qlen 1024, interleaved): prefetching B into L1 a few
//    steps ahead (no gain with prefetcht0, slower with prefetchnta; in scripts/amx_peak.cpp's
//    loop 23.3 and 40.7 TOPS against 31.3 and 41.2 with streamed B loads alone, two hosts),
//    chunks of 32 steps (slower), and chunks of all of K, A from L2 with no C round trips
//    (no gain);
//  * C: 4 tiles in registers over a chunk; between chunks they wait in a per-thread buffer,
//    the homes (L1 / L2), so y is written once, final.
// A slab spans all of K when its panels fit, and then the homes hold one token pair's C.
// With large K that leaves few row pairs (bf16, K 7168: one row block's panel is 224 KiB,
// so 2 row blocks), and each A chunk would serve only those before it leaves L1. So a slab
// has at least as many row blocks as homes of kHomeBytes can hold for all token blocks (at
// most kMaxSlabBlocks), over a K range cut to fit kSlabBytes. 16 threads over 64 (4, 8)
// DeepSeek-V3 gate matrices, builds with and without K ranges interleaved over 3 rounds:
// bf16 at 128 tokens 6.6-7.9 TFLOPS vs 4.5-5.1, at 1024 tokens 8.4-9.5 vs 6.4-7.7;
// int8_row at 128 tokens 10.1-14.9 TOPS vs 9.9-11.7, at 1024 within noise.
// Tile rows must not straddle cache lines (QuantActs and the homes are 64-byte aligned):
// unaligned, the 2x2 loop ran at 0.41x on 16 threads (scripts/amx_peak.cpp).
constexpr int64_t kSlabBytes = int64_t{768} << 10;
constexpr int64_t kHomeBytes = int64_t{512} << 10;
constexpr int64_t kMaxSlabBlocks = 32;
constexpr int64_t kChunkSteps = 16;

// The tile intrinsics paste their tile number into asm text: C tiles by literal.
template <int C>
inline void c_zero() {
  if constexpr (C == 0) _tile_zero(0);
  else if constexpr (C == 1) _tile_zero(1);
  else if constexpr (C == 2) _tile_zero(2);
  else _tile_zero(3);
}

template <int C>
inline void c_load(const void* p, int64_t stride) {
  if constexpr (C == 0) _tile_loadd(0, p, stride);
  else if constexpr (C == 1) _tile_loadd(1, p, stride);
  else if constexpr (C == 2) _tile_loadd(2, p, stride);
  else _tile_loadd(3, p, stride);
}

template <int C>
inline void c_store(void* p, int64_t stride) {
  if constexpr (C == 0) _tile_stored(0, p, stride);
  else if constexpr (C == 1) _tile_stored(1, p, stride);
  else if constexpr (C == 2) _tile_stored(2, p, stride);
  else _tile_stored(3, p, stride);
}

// Software prefetch into L2 of `pieces` byte ranges (`stride` apart), a few lines per K step
// of the work it hides behind.
struct Prefetch {
  const uint8_t* p = nullptr;
  int64_t piece_lines = 0, stride = 0, line = 0, left = 0, per_step = 0;

  void spread(const uint8_t* start, int64_t bytes, int64_t pieces, int64_t piece_stride, int64_t over_steps) {
    p = start;
    piece_lines = bytes / 64;
    stride = piece_stride;
    line = 0;
    left = start ? piece_lines * pieces : 0;
    per_step = (left + over_steps - 1) / std::max<int64_t>(over_steps, 1);
  }
  void step() {
    for (int64_t i = 0; i < per_step && left > 0; ++i, --left) {
      _mm_prefetch(reinterpret_cast<const char*>(p + line * 64), _MM_HINT_T1);
      if (++line == piece_lines) line = 0, p += stride;
    }
  }
};

struct FullK {
  const PackedWeight& w;
  const QuantActs& a;
  float* y;
  int64_t ldy, steps;
  const uint8_t* x;        // A tiles
  int32_t* homes;          // C tiles of home_tblocks token blocks x the slab between chunks
  int64_t home_tblocks = 2;  // a token pair, or all token blocks when slabs cut K
  int64_t slab0 = 0, slab_len = 0;
  Prefetch next_slab{};

  const uint8_t* panel(int64_t rb) const { return w.block(rb) + w.super_hdr; }
  const uint8_t* a_tiles(int64_t tb, int64_t s) const { return x + (tb * steps + s) * 1024; }
  bool whole(int64_t tb, int64_t rb) const { return (tb + 1) * 16 <= a.t && (rb + 1) * kRowBlock <= w.n; }
  int32_t* home(int64_t tb, int64_t rb) const { return homes + ((tb % home_tblocks) * slab_len + rb - slab0) * 256; }
};

// Final C tile (tb, rb) from c (16 x 16 int32 or f32 bits) to y: bf16 as is; int8
// y = s_w * (d * C - 128 * d * sum(q)), C holding the biased weights' products.
template <bool kBf16>
void finish(const FullK& f, const int32_t* c, int64_t tb, int64_t rb) {
  const int64_t row0 = rb * kRowBlock;
  const int valid = static_cast<int>(f.w.n - row0 < 16 ? f.w.n - row0 : 16);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  const __m512 sw = kBf16 ? _mm512_setzero_ps() : _mm512_loadu_ps(f.w.block(rb));
  const int64_t groups = f.a.kp / f.a.group;  // one scale per token, repeated per group
  for (int64_t t = tb * 16; t < std::min(f.a.t, tb * 16 + 16); ++t, c += 16) {
    __m512 v;
    if (kBf16) {
      v = _mm512_loadu_ps(c);
    } else {
      const __m512 ci = _mm512_cvtepi32_ps(_mm512_loadu_si512(c));
      v = _mm512_mul_ps(sw, _mm512_fmsub_ps(_mm512_set1_ps(f.a.scale[t * groups]), ci,
                                            _mm512_set1_ps(128.f * f.a.row_bsum[t])));
    }
    _mm512_mask_storeu_ps(f.y + t * f.ldy + row0, mask, v);
  }
}

template <int C>
inline void c_begin(const FullK& f, int64_t tb, int64_t rb, bool first) {
  if (first) return c_zero<C>();
  c_load<C>(f.home(tb, rb), 64);
}

template <bool kBf16, int C>
inline void c_end(const FullK& f, int64_t tb, int64_t rb, bool last) {
  if (!last) return c_store<C>(f.home(tb, rb), 64);
  if (kBf16 && f.whole(tb, rb))  // a whole bf16 tile is y as it stands
    return c_store<C>(f.y + tb * 16 * f.ldy + rb * kRowBlock, f.ldy * 4);
  alignas(64) int32_t c[256];
  c_store<C>(c, 64);
  finish<kBf16>(f, c, tb, rb);
}

// C tile (c) += A tile (x) . B tile (y).
#define KTJAX_TDP(c, x, y)                        \
  do {                                            \
    if constexpr (kBf16) _tile_dpbf16ps(c, x, y); \
    else _tile_dpbsud(c, x, y);                   \
  } while (0)

// Token blocks tb (and tb + 1 if NT == 2) x row blocks rb (and rb + 1 if NR == 2) over
// steps [s0, s1); C starts at zero on the first chunk and is final after the last.
template <bool kBf16, int NT, int NR>
void full_k_block(FullK& f, int64_t tb, int64_t rb, int64_t s0, int64_t s1) {
  const bool first = s0 == 0, last = s1 == f.steps;
  c_begin<0>(f, tb, rb, first);
  if constexpr (NR > 1) c_begin<1>(f, tb, rb + 1, first);
  if constexpr (NT > 1) c_begin<2>(f, tb + 1, rb, first);
  if constexpr (NT > 1 && NR > 1) c_begin<3>(f, tb + 1, rb + 1, first);
  const uint8_t* a0 = f.a_tiles(tb, s0);
  const uint8_t* a1 = a0 + f.steps * 1024;
  const uint8_t* b0 = f.panel(rb) + s0 * 1024;
  const uint8_t* b1 = f.panel(rb + NR - 1) + s0 * 1024;
  for (int64_t s = 0; s < (s1 - s0) * 1024; s += 1024) {
    f.next_slab.step();
    // Each load right before its first product, so loads overlap the products in flight.
    _tile_loadd(4, a0 + s, 64);
    _tile_stream_loadd(6, b0 + s, 64);
    KTJAX_TDP(0, 4, 6);
    if constexpr (NR > 1) {
      _tile_stream_loadd(7, b1 + s, 64);
      KTJAX_TDP(1, 4, 7);
    }
    if constexpr (NT > 1) {
      _tile_loadd(5, a1 + s, 64);
      KTJAX_TDP(2, 5, 6);
      if constexpr (NR > 1) KTJAX_TDP(3, 5, 7);
    }
  }
  c_end<kBf16, 0>(f, tb, rb, last);
  if constexpr (NR > 1) c_end<kBf16, 1>(f, tb, rb + 1, last);
  if constexpr (NT > 1) c_end<kBf16, 2>(f, tb + 1, rb, last);
  if constexpr (NT > 1 && NR > 1) c_end<kBf16, 3>(f, tb + 1, rb + 1, last);
}
#undef KTJAX_TDP

// Slab shape of a call: row blocks, K steps (at most steps), and the token blocks the homes
// hold.
struct SlabPlan {
  int64_t blocks, ksteps, home_tblocks;
};

SlabPlan plan_slabs(const PackedWeight& w, int64_t steps, int64_t tblocks, int64_t kc) {
  const int64_t fit = kSlabBytes / w.block_stride;
  const int64_t whole_k = fit < 2 ? 1 : fit / 2 * 2;  // whole row pairs
  const int64_t wanted = std::min(kMaxSlabBlocks, kHomeBytes / (tblocks * 1024)) / 2 * 2;
  if (wanted <= whole_k) return {whole_k, steps, 2};
  // K ranges of equal length (whole chunks) that fit kSlabBytes.
  const int64_t max_steps = std::max<int64_t>(kc, kSlabBytes / (wanted * 1024) / kc * kc);
  const int64_t ranges = (steps + max_steps - 1) / max_steps;
  const int64_t ksteps = std::min(steps, ((steps + ranges - 1) / ranges + kc - 1) / kc * kc);
  return {wanted, ksteps, (tblocks + 1) / 2 * 2};
}

// Every token pair over the current slab's rows and K steps [k0, k1), in chunks of kc steps:
// each chunk of a token pair's A serves all of the slab's row pairs from L1.
template <bool kBf16>
void pass_slab(FullK& f, int64_t k0, int64_t k1, int64_t kc) {
  const int64_t tblocks = (f.a.t + 15) / 16, slab1 = f.slab0 + f.slab_len;
  for (int64_t tb = 0; tb < tblocks; tb += 2) {
    const bool two_t = tb + 1 < tblocks;
    for (int64_t s0 = k0; s0 < k1; s0 += kc) {
      const int64_t s1 = std::min(s0 + kc, k1);
      for (int64_t rb = f.slab0; rb < slab1; rb += 2) {
        const bool two_r = rb + 1 < slab1;
        if (two_t && two_r) full_k_block<kBf16, 2, 2>(f, tb, rb, s0, s1);
        else if (two_r) full_k_block<kBf16, 1, 2>(f, tb, rb, s0, s1);
        else if (two_t) full_k_block<kBf16, 2, 1>(f, tb, rb, s0, s1);
        else full_k_block<kBf16, 1, 1>(f, tb, rb, s0, s1);
      }
    }
  }
}

template <bool kBf16>
void gemm_full_k(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y, int64_t ldy) {
  const int64_t steps = a.steps(), tblocks = (a.t + 15) / 16, tpairs = (tblocks + 1) / 2;
  const int64_t chunks = (steps + kChunkSteps - 1) / kChunkSteps, kc = (steps + chunks - 1) / chunks;
  const SlabPlan plan = plan_slabs(w, steps, tblocks, kc);
  // C homes between chunks: per thread, no allocation in steady state.
  thread_local AlignedVector<int32_t> tls_homes;
  AlignedVector<int32_t>& homes = tls_homes;
  if (chunks > 1) homes.resize(static_cast<size_t>(plan.home_tblocks * plan.blocks * 256));
  const uint8_t* x = kBf16 ? reinterpret_cast<const uint8_t*>(a.bf.data())
                           : reinterpret_cast<const uint8_t*>(a.q.data());
  FullK f{w, a, y, ldy, steps, x, homes.data(), plan.home_tblocks};
  for (int64_t slab0 = rb0; slab0 < rb1; slab0 += plan.blocks) {
    const int64_t slab1 = std::min(slab0 + plan.blocks, rb1), rpairs = (slab1 - slab0 + 1) / 2;
    f.slab0 = slab0;
    f.slab_len = slab1 - slab0;
    for (int64_t k0 = 0; k0 < steps; k0 += plan.ksteps) {
      const int64_t k1 = std::min(k0 + plan.ksteps, steps), over = tpairs * (k1 - k0) * rpairs;
      // Prefetch the next slab: this one's rows over the next K range, else the next rows
      // from K step 0 (none after the last).
      if (k1 < steps)
        f.next_slab.spread(f.panel(slab0) + k1 * 1024, (std::min(k1 + plan.ksteps, steps) - k1) * 1024,
                           slab1 - slab0, w.block_stride, over);
      else
        f.next_slab.spread(slab1 < rb1 ? f.panel(slab1) : nullptr, plan.ksteps * 1024,
                           std::min(slab1 + plan.blocks, rb1) - slab1, w.block_stride, over);
      pass_slab<kBf16>(f, k0, k1, kc);
    }
  }
}

// Scale or min vector of a group record (see gemm_body.h load_coef).
__m512 coef(const PackedWeight& w, const uint8_t* blk, const uint8_t* rec, int64_t g, int which) {
  const uint8_t* p = rec + w.group_bytes + which * w.coef_bytes;
  switch (w.scale_enc) {
    case ScaleEnc::F16: return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    case ScaleEnc::F32: return _mm512_loadu_ps(p);
    case ScaleEnc::I8:
      return _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))),
          _mm512_loadu_ps(blk + w.super_off(g) + which * 64));
    case ScaleEnc::Row:  // full-K kernel, never here
    case ScaleEnc::None: break;
  }
  return _mm512_setzero_ps();
}

// Issues group g's tile product into C tile 0 + P (A tile 2 + P, B tile 4 + P); int4
// weights are first unpacked to bytes in bbuf. x: the token block's A tiles, where group g
// is G columns of K step g * G / 64.
template <int P, bool kInt4, int G>
inline void issue_group(const PackedWeight& w, const uint8_t* blk, const int8_t* x, int64_t g, uint8_t* bbuf) {
  const uint8_t* rec = blk + w.group_off(g);
  const int8_t* xg = x + (g * G / 64) * 1024 + g * G % 64;
  if (kInt4) {  // chunk p: quads 2p (low nibbles) and 2p + 1 (high) -> B rows in order
    const __m512i m = _mm512_set1_epi8(0x0f);
    for (int p = 0; p < G / 8; ++p) {
      const __m512i v = _mm512_loadu_si512(rec + 64 * p);
      _mm512_store_si512(bbuf + 128 * p, _mm512_and_si512(v, m));
      _mm512_store_si512(bbuf + 128 * p + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), m));
    }
  } else {  // unbiased (q + 128 -> q), so TDPBSSD needs no 128 * sum(q_x) correction
    const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int p = 0; p < G / 4; ++p)
      _mm512_store_si512(bbuf + 64 * p, _mm512_xor_si512(_mm512_loadu_si512(rec + 64 * p), bias));
  }
  // The tile intrinsics paste their tile number into asm text: literals only.
#define KTJAX_ISSUE(c, x, y)        \
  do {                              \
    _tile_zero(c);                  \
    _tile_loadd(x, xg, 64);         \
    _tile_loadd(y, bbuf, 64);       \
    if (kInt4) _tile_dpbsud(c, x, y); \
    else _tile_dpbssd(c, x, y);     \
  } while (0)
  if constexpr (P == 0) KTJAX_ISSUE(0, 2, 4);
  else KTJAX_ISSUE(1, 3, 5);
#undef KTJAX_ISSUE
}

// int8 / int4, one token block x one row block. Group g + 1's tile product runs while
// group g's int32 results are scaled in AVX-512 registers (C tiles 0 and 1 alternate).
// Both halves cost alike: DeepSeek-V3 shape, 64 experts, qlen 1024, Q8_0 (Q4_K), with
// one half switched off in turn, a layer took 135-150 (133-157) ms with tile work only,
// 97-105 (124-132) with vector work only, 173-204 (234-267) with both; a group's tile
// product has K = 32 (half a tile), so products alone cost twice int8_row's. Tried and
// dropped (interleaved against this on the AMX host): 2 token x 2 row blocks per group, B
// and scales prepared once per row pair into a panel, C tiles of 4 groups batched through
// an L1 buffer, with or without the next batch's tile products spread between the vector
// work; Q8_0 gained 1.25-1.33x on one host and lost 0.82-1.02x on another, Q4_0 / Q4_K
// lost up to 0.71x.
template <bool kInt4, int G, bool kMin>
void int_block(const PackedWeight& w, const QuantActs& a, int64_t rb, int64_t t0, float* y, int64_t ldy) {
  alignas(64) int32_t cbuf[16 * 16];
  alignas(64) uint8_t bbuf[2][G * 16];
  const int64_t groups = w.kp / G;
  const uint8_t* blk = w.block(rb);
  const int8_t* x = a.q.data() + a.offset(t0, 0);
  const float* xs = a.scale.data() + t0 * groups;
  const float* xb = a.bsum.data() + t0 * groups;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  issue_group<0, kInt4, G>(w, blk, x, 0, bbuf[0]);
  for (int64_t g = 0; g < groups; ++g) {
    if (g % 2 == 0) {
      if (g + 1 < groups) issue_group<1, kInt4, G>(w, blk, x, g + 1, bbuf[1]);
      _tile_stored(0, cbuf, 64);
    } else {
      if (g + 1 < groups) issue_group<0, kInt4, G>(w, blk, x, g + 1, bbuf[0]);
      _tile_stored(1, cbuf, 64);
    }
    const uint8_t* rec = blk + w.group_off(g);
    const __m512 s = coef(w, blk, rec, g, 0);
    const __m512 mn = kMin ? coef(w, blk, rec, g, 1) : _mm512_setzero_ps();
    for (int i = 0; i < 16; ++i) {
      const __m512 c = _mm512_cvtepi32_ps(_mm512_load_si512(cbuf + 16 * i));
      acc[i] = _mm512_fmadd_ps(c, _mm512_mul_ps(s, _mm512_set1_ps(xs[i * groups + g])), acc[i]);
      if (kMin) acc[i] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xb[i * groups + g]), acc[i]);
    }
  }
  const int64_t row0 = rb * kRowBlock;
  const int valid = static_cast<int>(w.n - row0 < 16 ? w.n - row0 : 16);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  for (int i = 0; i < 16 && t0 + i < a.t; ++i) _mm512_mask_storeu_ps(y + (t0 + i) * ldy + row0, mask, acc[i]);
}

template <bool kInt4, int G>
void gemm_int(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y, int64_t ldy) {
  const int64_t tblocks = (a.t + 15) / 16;
  for (int64_t rb = rb0; rb < rb1; ++rb)
    for (int64_t tb = 0; tb < tblocks; ++tb)
      w.has_min ? int_block<kInt4, G, true>(w, a, rb, 16 * tb, y, ldy) : int_block<kInt4, G, false>(w, a, rb, 16 * tb, y, ldy);
}

void gemm_amx(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y, int64_t ldy) {
  if (!a.tiled) return kernels_avx512().gemm(w, a, rb0, rb1, y, ldy);
  TileConfig cfg;
  const bool full_k = w.kind == WeightKind::BF16 || w.scale_enc == ScaleEnc::Row;
  if (full_k) {  // all tiles 16 rows x 64 bytes
    for (int i = 0; i < 8; ++i) configure(i, 16, 64, &cfg);
  } else {  // C 0-1, A 2-3, B 4-5 (two sets, alternating by group)
    for (int p = 0; p < 2; ++p) {
      configure(p, 16, 64, &cfg);
      configure(2 + p, 16, w.group, &cfg);
      configure(4 + p, w.group / 4, 64, &cfg);
    }
  }
  _tile_loadconfig(&cfg);
  if (w.kind == WeightKind::BF16) {
    gemm_full_k<true>(w, a, rb0, rb1, y, ldy);
  } else if (full_k) {
    gemm_full_k<false>(w, a, rb0, rb1, y, ldy);
  } else if (w.kind == WeightKind::Int4) {
    w.group == 16 ? gemm_int<true, 16>(w, a, rb0, rb1, y, ldy) : gemm_int<true, 32>(w, a, rb0, rb1, y, ldy);
  } else {
    w.group == 16 ? gemm_int<false, 16>(w, a, rb0, rb1, y, ldy) : gemm_int<false, 32>(w, a, rb0, rb1, y, ldy);
  }
  _tile_release();
}

}  // namespace

const LinearKernels& kernels_amx() {
  // prepare is AVX-512's: it writes tiled rows as well (QuantActs::q_at).
  static const LinearKernels k{kernels_avx512().prepare, &gemm_amx, kAmxMinTokens};
  return k;
}

}  // namespace ktjax
