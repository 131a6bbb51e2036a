// AMX linear kernels for calls with enough tokens to fill tiles (prefill, busy experts).
// Dispatched only when detected_isa() is Amx (CPUID + OS tile state + the arch_prctl
// permission requested in isa.cpp); fewer tokens go to the AVX-512 kernels.
//
// Every path accumulates all of K in the tiles (gemm_full_k). A tiles come from the
// activations as prepare tiled them (QuantActs::tiled: one K step of 16 tokens is 1 KiB,
// contiguous); rows are padded to a multiple of 16 tokens, so tile loads stay in bounds.
//  * bf16 and int8 with Row scales: B tiles are the packed row block as is (VNNI-ordered,
//    16 rows of 64 bytes per K step); TDPBF16PS / TDPBSUD, C scaled once at the end.
//  * group-scaled int8 / int4: each slab of the weight is first dequantized to bf16 B tiles
//    in a per-thread buffer (scale * q + min, once per call, however many tokens), then
//    multiplied with bf16 activations like bf16 weights (see linear.h). One int8 product per
//    group instead fills only 32 (or 16) of a tile's 64 k and needs its int32 result scaled
//    per token row in AVX-512, which the tile unit waits for.
//    Figures, and the overlapped dequantization that lost: docs/kernel-notes.md#amx-linear.
//
// Built with -DKTJAX_AMX_EMULATE (tests only), the tile instructions run in software.
#include <immintrin.h>

#ifdef KTJAX_AMX_EMULATE
#include "cpu_kernels/amx/amx_emulation.h"
#endif

#include <algorithm>
#include <utility>

#include "cpu_kernels/amx/tile_config.h"
#include "cpu_kernels/avx512/v512.h"
#include "cpu_kernels/linear/gemm_body.h"
#include "cpu_kernels/linear/linear.h"
#include "cpu_kernels/unit_local.h"

namespace ktjax {
namespace {

constexpr int kAmxMinTokens = 16;

// Full-K kernels: bf16 (TDPBF16PS; bf16 weights, or group-scaled ones dequantized to bf16
// slab by slab) and int8 with Row scales (TDPBSUD; one scale per row and per token, so all
// of K accumulates in int32). A K step is 64 bytes of each token row (32 bf16 or 64 int8)
// against the 1 KiB B tile of a row block. Tiles 0-3 = C (token block i,
// row block j at 2i + j), 4-5 = A, 6-7 = B: a step loads 4 tiles for 4 tile products.
// Every tile load must hit L1 or L2 (a tile load that misses L2 stalls the products behind
// it), so per thread and call (one core: L1 48 KiB, L2 2 MiB):
//  * B: the call's row blocks go in slabs, a slab being some row blocks' panels over a K
//    range, at most kSlabBytes; a slab stays in L2 while every token pair passes over it,
//    so each weight byte comes from memory once per call, prefetched while the previous
//    slab computes;
//  * A: a token pair's tiles go in chunks of about kChunkSteps K steps (2 x 16 KiB) that
//    stay in L1 while the slab's row pairs use them (A is shared by the threads and comes
//    from L3 or L2 once per slab). B tiles, used once per token pair, load with the
//    streaming hint (TILELOADDT1) so they do not evict the A chunk from L1;
//  * C: 4 tiles in registers over a chunk; between chunks they wait in a per-thread buffer,
//    the homes (L1 / L2), so y is written once, final.
// A slab spans all of K when its panels fit, and then the homes hold one token pair's C.
// With large K that leaves few row pairs (bf16, K 7168: one row block's panel is 224 KiB,
// so 2 row blocks), and each A chunk would serve only those before it leaves L1. So a slab
// has at least as many row blocks as homes of kHomeBytes can hold for all token blocks (at
// most kMaxSlabBlocks), over a K range cut to fit kSlabBytes.
// Tile rows must not straddle cache lines (QuantActs and the homes are 64-byte aligned).
// The loop is bound inside the core, not by memory. The sizes below were measured against
// their alternatives, as were other tile schedules and prefetches that lost:
// docs/kernel-notes.md#amx-linear.
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
  // B tiles: row block rb's K step s at b + (rb - b_rb0) * b_stride + (s - b_s0) * 1024 (the
  // packed panels, or the slab dequantized to bf16).
  const uint8_t* b = nullptr;
  int64_t b_rb0 = 0, b_stride = 0, b_s0 = 0;

  const uint8_t* b_tile(int64_t rb, int64_t s) const { return b + (rb - b_rb0) * b_stride + (s - b_s0) * 1024; }
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
  const uint8_t* b0 = f.b_tile(rb, s0);
  const uint8_t* b1 = f.b_tile(rb + NR - 1, s0);
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

// A call of exactly two token blocks (17-32 tokens: most experts of DeepSeek-V3's 256 at
// qlen 1024) takes its row blocks one at a time instead of in pairs: C tiles 0-1, A 4-5, and
// B in tiles 6 and 7 by alternate K steps, so a B load never waits for the product still
// reading the previous B tile (docs/kernel-notes.md#amx-linear; one token block the same way
// did not pay).
template <bool kBf16>
void token_pair_row_block(FullK& f, int64_t rb, int64_t s0, int64_t s1) {
  const bool first = s0 == 0, last = s1 == f.steps;
  c_begin<0>(f, 0, rb, first);
  c_begin<1>(f, 1, rb, first);
  const uint8_t* a0 = f.a_tiles(0, s0);
  const uint8_t* a1 = a0 + f.steps * 1024;
  const uint8_t* b = f.b_tile(rb, s0);
  const int64_t n = (s1 - s0) * 1024;
  for (int64_t s = 0; s < n; s += 2048) {
    f.next_slab.step();
    _tile_stream_loadd(6, b + s, 64);
    _tile_loadd(4, a0 + s, 64);
    KTJAX_TDP(0, 4, 6);
    _tile_loadd(5, a1 + s, 64);
    KTJAX_TDP(1, 5, 6);
    if (s + 1024 == n) break;
    f.next_slab.step();
    _tile_stream_loadd(7, b + s + 1024, 64);
    _tile_loadd(4, a0 + s + 1024, 64);
    KTJAX_TDP(0, 4, 7);
    _tile_loadd(5, a1 + s + 1024, 64);
    KTJAX_TDP(1, 5, 7);
  }
  c_end<kBf16, 0>(f, 0, rb, last);
  c_end<kBf16, 1>(f, 1, rb, last);
}
#undef KTJAX_TDP

// Slab shape of a call: row blocks, K steps (at most steps), and the token blocks the homes
// hold.
struct SlabPlan {
  int64_t blocks, ksteps, home_tblocks;
};

SlabPlan plan_slabs(int64_t panel_bytes, int64_t steps, int64_t tblocks, int64_t kc) {
  const int64_t fit = kSlabBytes / panel_bytes;
  const int64_t whole_k = fit < 2 ? 1 : fit / 2 * 2;  // whole row pairs
  const int64_t wanted = std::min(kMaxSlabBlocks, kHomeBytes / (tblocks * 1024)) / 2 * 2;
  if (wanted <= whole_k) return {whole_k, steps, 2};
  // K ranges of equal length (whole chunks) that fit kSlabBytes.
  const int64_t max_steps = std::max<int64_t>(kc, kSlabBytes / (wanted * 1024) / kc * kc);
  const int64_t ranges = (steps + max_steps - 1) / max_steps;
  const int64_t ksteps = std::min(steps, ((steps + ranges - 1) / ranges + kc - 1) / kc * kc);
  return {wanted, ksteps, (tblocks + 1) / 2 * 2};
}

// K steps pass_slab takes over a slab of slab_len row blocks and a K range of ksteps (per
// row pair, or per row block for two token blocks): the next slab's prefetch spreads over them.
int64_t pass_steps(int64_t tblocks, int64_t ksteps, int64_t slab_len) {
  if (tblocks == 2) return ksteps * slab_len;
  return (tblocks + 1) / 2 * ksteps * ((slab_len + 1) / 2);
}

// Every token pair over the current slab's rows and K steps [k0, k1), in chunks of kc steps:
// each chunk of a token pair's A serves all of the slab's row pairs from L1.
template <bool kBf16>
void pass_slab(FullK& f, int64_t k0, int64_t k1, int64_t kc) {
  const int64_t tblocks = (f.a.t + 15) / 16, slab1 = f.slab0 + f.slab_len;
  if (tblocks == 2) {
    for (int64_t s0 = k0; s0 < k1; s0 += kc)
      for (int64_t rb = f.slab0; rb < slab1; ++rb) token_pair_row_block<kBf16>(f, rb, s0, std::min(s0 + kc, k1));
    return;
  }
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

// Group g of row block blk, dequantized (scale * q + min in one rounding, then to bf16, as
// the scalar reference) into G / 2 rows of a bf16 B tile (row r: k 2r and 2r + 1 of the 16
// weight rows, VNNI pairs). A quad of the packed group (k 4q..4q+3 of the 16 rows, 64
// bytes) becomes rows 2q and 2q + 1. Int4 with kHi bit planes holds 4 + kHi bits.
template <bool kInt4, int G, int kHi>
void dequant_group(const PackedWeight& w, const uint8_t* blk, int64_t g, uint8_t* rows) {
  const uint8_t* rec = blk + w.group_off(g);
  const __m512 s = body::load_coef<V512>(w, blk, rec, g, 0);
  const __m512 m = w.has_min ? body::load_coef<V512>(w, blk, rec, g, 1) : _mm512_setzero_ps();
  // Lanes of quarter i of a quad are rows 4i..4i+3, 4 k each.
  __m512 sq[4], mq[4];
  for (int i = 0; i < 4; ++i) {
    const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(4 * i), _mm512_srli_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 2));
    sq[i] = _mm512_permutexvar_ps(idx, s);
    mq[i] = _mm512_permutexvar_ps(idx, m);
  }
  // Dwords of two bf16 vectors [rows 0-7 | rows 8-15], each row (k 4q, 4q+1) then (4q+2, 4q+3).
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  alignas(64) int8_t q[64];  // the quad's values as signed bytes
  for (int p = 0; p < G / 4; ++p) {
    if (kInt4) {  // chunk c: quads 2c (low nibbles) and 2c + 1 (high)
      const __m512i v = _mm512_loadu_si512(rec + 64 * (p / 2));
      __m512i u = _mm512_and_si512(p % 2 ? _mm512_srli_epi16(v, 4) : v, _mm512_set1_epi8(0x0f));
      for (int b = 0; b < kHi; ++b) u = V512::add_bit(u, rec + plane_offset(G, b) + 8 * p, 4 + b);
      _mm512_store_si512(q, u);
    } else {  // stored q + 128
      _mm512_store_si512(q, _mm512_xor_si512(_mm512_loadu_si512(rec + 64 * p), _mm512_set1_epi8(static_cast<char>(0x80))));
    }
    __m512 f[4];
    for (int i = 0; i < 4; ++i)
      f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + 16 * i)))),
                             sq[i], mq[i]);
    const __m512i lo = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[1], f[0]));
    const __m512i hi = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[3], f[2]));
    _mm512_store_si512(rows + 128 * p, _mm512_permutex2var_epi32(lo, even, hi));
    _mm512_store_si512(rows + 128 * p + 64, _mm512_permutex2var_epi32(lo, odd, hi));
  }
}

// Row blocks [rb0, rb1) of a group-scaled w over bf16 K steps [s0, s1) (32 k each) as bf16
// B tiles: row block rb's step s at out + ((rb - rb0) * (s1 - s0) + s - s0) * 1024.
template <bool kInt4, int G, int kHi>
void dequant_slab(const PackedWeight& w, int64_t rb0, int64_t rb1, int64_t s0, int64_t s1, uint8_t* out) {
  for (int64_t rb = rb0; rb < rb1; ++rb)
    for (int64_t s = s0; s < s1; ++s, out += 1024)
      for (int64_t g = s * 32 / G; g < (s + 1) * 32 / G; ++g)
        dequant_group<kInt4, G, kHi>(w, w.block(rb), g, out + (g * G % 32) * 32);
}

// {offset, bytes} inside a packed row block of the K steps [s0, s1) a call reads: steps of
// the packed tiles, or (dequant) of 32 k over the group records and super-block headers.
std::pair<int64_t, int64_t> packed_span(const PackedWeight& w, bool dequant, int64_t s0, int64_t s1) {
  if (!dequant) return {w.super_hdr + s0 * 1024, (s1 - s0) * 1024};
  const int64_t g0 = s0 * 32 / w.group, g1 = s1 * 32 / w.group;  // whole super-blocks with their headers
  return {w.super_off(g0), w.super_off(g1 - 1) + w.super_bytes - w.super_off(g0)};
}

// The full-K kernels over row blocks [rb0, rb1). kDequant: w is group-scaled int8 / int4
// (kInt4, G, kHi bit planes) and each slab is dequantized to bf16 tiles in a per-thread
// buffer first, then multiplied as bf16 weights are; the packed slab it reads was prefetched
// into L2 while the previous slab computed.
template <bool kBf16, bool kDequant = false, bool kInt4 = false, int G = 32, int kHi = 0>
void gemm_full_k(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y, int64_t ldy) {
  const int64_t steps = a.steps(), tblocks = (a.t + 15) / 16;
  const int64_t chunks = (steps + kChunkSteps - 1) / kChunkSteps, kc = (steps + chunks - 1) / chunks;
  const SlabPlan plan = plan_slabs(kDequant ? steps * 1024 : w.block_stride, steps, tblocks, kc);
  // C homes between chunks and the dequantized slab: per thread, no allocation in steady
  // state.
  thread_local UnitVector<int32_t> tls_homes;
  thread_local UnitVector<uint8_t> tls_slab;
  UnitVector<int32_t>& homes = tls_homes;
  if (chunks > 1) homes.resize(static_cast<size_t>(plan.home_tblocks * plan.blocks * 256));
  if (kDequant) tls_slab.resize(static_cast<size_t>(plan.blocks * plan.ksteps * 1024));
  const uint8_t* x = kBf16 ? reinterpret_cast<const uint8_t*>(a.bf.data())
                           : reinterpret_cast<const uint8_t*>(a.q.data());
  FullK f{w, a, y, ldy, steps, x, homes.data(), plan.home_tblocks};
  if (!kDequant) {
    f.b = w.data.get() + w.super_hdr;
    f.b_stride = w.block_stride;
  }
  for (int64_t slab0 = rb0; slab0 < rb1; slab0 += plan.blocks) {
    const int64_t slab1 = std::min(slab0 + plan.blocks, rb1);
    f.slab0 = slab0;
    f.slab_len = slab1 - slab0;
    for (int64_t k0 = 0; k0 < steps; k0 += plan.ksteps) {
      const int64_t k1 = std::min(k0 + plan.ksteps, steps);
      if (kDequant) {
        dequant_slab<kInt4, G, kHi>(w, slab0, slab1, k0, k1, tls_slab.data());
        f.b = tls_slab.data();
        f.b_rb0 = slab0;
        f.b_stride = (k1 - k0) * 1024;
        f.b_s0 = k0;
      }
      // Prefetch the next slab: this one's rows over the next K range, else the next rows
      // from K step 0 (none after the last).
      const bool next_k = k1 < steps;
      const int64_t n0 = next_k ? slab0 : slab1, n1 = next_k ? slab1 : std::min(slab1 + plan.blocks, rb1);
      const auto [off, bytes] = next_k ? packed_span(w, kDequant, k1, std::min(k1 + plan.ksteps, steps))
                                       : packed_span(w, kDequant, 0, plan.ksteps);
      f.next_slab.spread(n0 < n1 ? w.block(n0) + off : nullptr, bytes, n1 - n0, w.block_stride,
                         pass_steps(tblocks, k1 - k0, slab1 - slab0));
      pass_slab<kBf16>(f, k0, k1, kc);
    }
  }
}

void gemm_amx(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y, int64_t ldy) {
  if (!a.tiled) return kernels_avx512().gemm(w, a, rb0, rb1, y, ldy);
  configure_tiles();
  const bool int4 = w.kind == WeightKind::Int4, g16 = w.group == 16, hi = w.hi_bits > 0;
  // The layouts make_packed allows: int8 in groups of 32; int4 in groups of 16 (6-bit with
  // planes) or 32 (5-bit with a plane).
  if (w.kind == WeightKind::BF16) gemm_full_k<true>(w, a, rb0, rb1, y, ldy);
  else if (!a.bf16) gemm_full_k<false>(w, a, rb0, rb1, y, ldy);  // Row scales
  else if (!int4) gemm_full_k<true, true, false, 32>(w, a, rb0, rb1, y, ldy);
  else if (g16) hi ? gemm_full_k<true, true, true, 16, 2>(w, a, rb0, rb1, y, ldy) : gemm_full_k<true, true, true, 16>(w, a, rb0, rb1, y, ldy);
  else hi ? gemm_full_k<true, true, true, 32, 1>(w, a, rb0, rb1, y, ldy) : gemm_full_k<true, true, true, 32>(w, a, rb0, rb1, y, ldy);
  _tile_release();
}

}  // namespace

const LinearKernels& kernels_amx() {
  // prepare is AVX-512's: it writes tiled rows as well (QuantActs::q_at).
  static const LinearKernels fast{kernels_avx512().prepare, &gemm_amx, kAmxMinTokens, kAmxMinTokens};
  // Batch-invariant: tiles only for int8_row weights, whose AVX-512 formula is the tiles'.
  static const LinearKernels invariant{kernels_avx512().prepare, &gemm_amx, kAmxMinTokens, 0, false};
  return batch_invariant() ? invariant : fast;
}

}  // namespace ktjax
