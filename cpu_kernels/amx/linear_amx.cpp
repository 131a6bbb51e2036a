// AMX linear kernels for calls with enough tokens to fill tiles (prefill, busy experts).
// Dispatched only when detected_isa() is Amx (CPUID + OS tile state + the arch_prctl
// permission requested in isa.cpp); fewer tokens go to the AVX-512 kernels.
//
// Tiles use the packed layout as is: a group record of 16 rows is a VNNI-ordered B tile
// (int8: G/4 rows of 64 bytes; bf16: 16 rows of 64 bytes = 32 k). Activation rows are A
// tiles; QuantActs pads its rows to a multiple of 16 tokens, so tile loads stay in bounds.
//  * bf16 and int8 with Row scales: TDPBF16PS / TDPBSUD accumulate over all of K in the
//    tiles (gemm_full_k); C is scaled once at the end.
//  * int8 / int4: TDPBSUD (signed activations x biased unsigned weights) per group, then
//    the group's scales applied in AVX-512 registers, 16 token rows at a time, while the
//    next group's tile product runs.
#include <immintrin.h>

#include <cstring>
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
// bf16 or 64 int8) against a contiguous 1 KiB B tile of the row block (16 VNNI rows).
// Tiles 0-3 = C (token block i, row block j at 2i + j), 4-5 = A, 6-7 = B. With 2x2 blocking a
// step loads 4 KiB for 4 tile products, a rate only L1 sustains, so K is cut into chunks
// whose B panel (2 row blocks x kChunkSteps KiB) stays in L1 while every token block passes
// over it (A then streams from L2 at half that rate); C tiles wait in a per-thread buffer
// between chunks.
constexpr int kChunkSteps = 12;

// C tile (c) += A tile (x) . B tile (y); the tile intrinsics paste their tile numbers into
// asm text, so these are literals.
#define KTJAX_TDP(c, x, y)                    \
  do {                                        \
    if constexpr (kBf16) _tile_dpbf16ps(c, x, y); \
    else _tile_dpbsud(c, x, y);               \
  } while (0)

// Steps [s0, s1) of NT token blocks (A rows at a, stride lda) x NR row blocks (B at b0, b1),
// C tiles from / to cbuf (1 KiB per tile, index 2 * token block + row block). pf0 / pf1: the
// next panel, prefetched to L2 one KiB per row block and step.
template <bool kBf16, int NT, int NR>
void full_k_block(const uint8_t* a, int64_t lda, const uint8_t* b0, const uint8_t* b1, int64_t s0,
                  int64_t s1, int32_t* cbuf, bool load_c, const uint8_t* pf0, const uint8_t* pf1) {
  if (load_c) {
    _tile_loadd(0, cbuf, 64);
    if (NR > 1) _tile_loadd(1, cbuf + 256, 64);
    if (NT > 1) _tile_loadd(2, cbuf + 512, 64);
    if (NT > 1 && NR > 1) _tile_loadd(3, cbuf + 768, 64);
  } else {
    _tile_zero(0);
    if (NR > 1) _tile_zero(1);
    if (NT > 1) _tile_zero(2);
    if (NT > 1 && NR > 1) _tile_zero(3);
  }
  const uint8_t* a1 = a + 16 * lda;
  for (int64_t s = s0; s < s1; ++s) {
    if (pf0)
      for (int off = 0; off < 1024; off += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(pf0 + (s - s0) * 1024 + off), _MM_HINT_T1);
        if (NR > 1) _mm_prefetch(reinterpret_cast<const char*>(pf1 + (s - s0) * 1024 + off), _MM_HINT_T1);
      }
    _tile_loadd(6, b0 + s * 1024, 64);
    if (NR > 1) _tile_loadd(7, b1 + s * 1024, 64);
    _tile_loadd(4, a + s * 64, lda);
    KTJAX_TDP(0, 4, 6);
    if (NR > 1) KTJAX_TDP(1, 4, 7);
    if (NT > 1) {
      _tile_loadd(5, a1 + s * 64, lda);
      KTJAX_TDP(2, 5, 6);
      if (NR > 1) KTJAX_TDP(3, 5, 7);
    }
  }
  _tile_stored(0, cbuf, 64);
  if (NR > 1) _tile_stored(1, cbuf + 256, 64);
  if (NT > 1) _tile_stored(2, cbuf + 512, 64);
  if (NT > 1 && NR > 1) _tile_stored(3, cbuf + 768, 64);
}
#undef KTJAX_TDP

template <bool kBf16>
void gemm_full_k(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y, int64_t ldy) {
  const int64_t steps = kBf16 ? w.kp / 32 : w.kp / 64, tblocks = (a.t + 15) / 16;
  const int64_t lda = kBf16 ? a.kp * 2 : a.kp;
  const uint8_t* x = kBf16 ? reinterpret_cast<const uint8_t*>(a.bf.data())
                           : reinterpret_cast<const uint8_t*>(a.q.data());
  // Per-thread buffers, no allocation in steady state: C tiles of a row-block pair for all
  // token blocks; int8: each token's scale d and d * sum(q) (the bias term's factor).
  thread_local std::vector<int32_t> tls_c;
  thread_local std::vector<float> tls_d, tls_b;
  std::vector<int32_t>& cb = tls_c;
  cb.resize(static_cast<size_t>((tblocks + 1) / 2 * 4 * 256));
  const float *td = nullptr, *tbs = nullptr;
  if (!kBf16) {
    const int64_t groups = w.kp / w.group;
    tls_d.resize(a.t);
    tls_b.resize(a.t);
    for (int64_t t = 0; t < a.t; ++t) {
      float sum = 0.f;
      for (int64_t g = 0; g < groups; ++g) sum += a.bsum[t * groups + g];
      tls_d[t] = a.scale[t * groups];
      tls_b[t] = 128.f * sum;
    }
    td = tls_d.data();
    tbs = tls_b.data();
  }
  auto panel = [&](int64_t rb) { return rb < rb1 ? w.block(rb) + w.super_hdr : nullptr; };
  for (int64_t rb = rb0; rb < rb1; rb += 2) {
    const bool two_r = rb + 1 < rb1;
    const uint8_t* b0 = panel(rb);
    const uint8_t* b1 = two_r ? panel(rb + 1) : b0;
    for (int64_t s0 = 0; s0 < steps; s0 += kChunkSteps) {
      const int64_t s1 = s0 + kChunkSteps < steps ? s0 + kChunkSteps : steps;
      // The first token pair prefetches the next chunk (or the next row-block pair's first).
      const uint8_t* pf0 = s1 < steps ? b0 + s1 * 1024 : panel(rb + 2);
      const uint8_t* pf1 = s1 < steps ? b1 + s1 * 1024 : panel(rb + 3);
      if (!pf1) pf1 = pf0;
      for (int64_t tb = 0; tb < tblocks; tb += 2) {
        const bool two_t = tb + 1 < tblocks;
        const uint8_t* xa = x + tb * 16 * lda;
        int32_t* c = cb.data() + tb / 2 * 1024;
        const uint8_t* p0 = tb == 0 ? pf0 : nullptr;
        if (two_t && two_r) full_k_block<kBf16, 2, 2>(xa, lda, b0, b1, s0, s1, c, s0 > 0, p0, pf1);
        else if (two_r) full_k_block<kBf16, 1, 2>(xa, lda, b0, b1, s0, s1, c, s0 > 0, p0, pf1);
        else if (two_t) full_k_block<kBf16, 2, 1>(xa, lda, b0, b1, s0, s1, c, s0 > 0, p0, pf1);
        else full_k_block<kBf16, 1, 1>(xa, lda, b0, b1, s0, s1, c, s0 > 0, p0, pf1);
      }
    }
    // C tiles to y: bf16 as is; int8 y = s_w * (d * C - 128 * d * sum(q)), C holding the
    // biased weights' products.
    for (int r = 0; r < (two_r ? 2 : 1); ++r) {
      const int64_t row0 = (rb + r) * kRowBlock;
      if (row0 >= w.n) break;
      const int valid = static_cast<int>(w.n - row0 < 16 ? w.n - row0 : 16);
      const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
      const __m512 sw = kBf16 ? _mm512_setzero_ps() : _mm512_loadu_ps(w.block(rb + r));
      for (int64_t t = 0; t < a.t; ++t) {
        const int32_t* c = cb.data() + t / 32 * 1024 + ((t / 16) % 2 * 2 + r) * 256 + (t % 16) * 16;
        __m512 v;
        if (kBf16) {
          v = _mm512_loadu_ps(reinterpret_cast<const float*>(c));
        } else {
          const __m512 ci = _mm512_cvtepi32_ps(_mm512_loadu_si512(c));
          v = _mm512_mul_ps(sw, _mm512_fmsub_ps(_mm512_set1_ps(td[t]), ci, _mm512_set1_ps(tbs[t])));
        }
        _mm512_mask_storeu_ps(y + t * ldy + row0, mask, v);
      }
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
// weights are first unpacked to bytes in bbuf.
template <int P, bool kInt4, int G>
inline void issue_group(const PackedWeight& w, const uint8_t* blk, const int8_t* x, int64_t lda, int64_t g,
                        uint8_t* bbuf) {
  const uint8_t* rec = blk + w.group_off(g);
  const uint8_t* bsrc = rec;
  if (kInt4) {  // chunk p: quads 2p (low nibbles) and 2p + 1 (high) -> B rows in order
    const __m512i m = _mm512_set1_epi8(0x0f);
    for (int p = 0; p < G / 8; ++p) {
      const __m512i v = _mm512_loadu_si512(rec + 64 * p);
      _mm512_store_si512(bbuf + 128 * p, _mm512_and_si512(v, m));
      _mm512_store_si512(bbuf + 128 * p + 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), m));
    }
    bsrc = bbuf;
  }
  // The tile intrinsics paste their tile number into asm text: literals only.
  if constexpr (P == 0) {
    _tile_zero(0);
    _tile_loadd(2, x + g * G, lda);
    _tile_loadd(4, bsrc, 64);
    _tile_dpbsud(0, 2, 4);
  } else {
    _tile_zero(1);
    _tile_loadd(3, x + g * G, lda);
    _tile_loadd(5, bsrc, 64);
    _tile_dpbsud(1, 3, 5);
  }
}

// int8 / int4, one token block x one row block. Group g + 1's tile product runs while
// group g's int32 results are scaled in AVX-512 registers (C tiles 0 and 1 alternate).
template <bool kInt4, int G>
void int_block(const PackedWeight& w, const QuantActs& a, int64_t rb, int64_t t0, float* y, int64_t ldy) {
  alignas(64) int32_t cbuf[16 * 16];
  alignas(64) uint8_t bbuf[2][G * 16];
  const int64_t groups = w.kp / G;
  const uint8_t* blk = w.block(rb);
  const int8_t* x = a.q.data() + t0 * a.kp;
  const float* xs = a.scale.data() + t0 * groups;
  const float* xb = a.bsum.data() + t0 * groups;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  issue_group<0, kInt4, G>(w, blk, x, a.kp, 0, bbuf[0]);
  for (int64_t g = 0; g < groups; ++g) {
    if (g % 2 == 0) {
      if (g + 1 < groups) issue_group<1, kInt4, G>(w, blk, x, a.kp, g + 1, bbuf[1]);
      _tile_stored(0, cbuf, 64);
    } else {
      if (g + 1 < groups) issue_group<0, kInt4, G>(w, blk, x, a.kp, g + 1, bbuf[0]);
      _tile_stored(1, cbuf, 64);
    }
    const uint8_t* rec = blk + w.group_off(g);
    const __m512 s = coef(w, blk, rec, g, 0);
    __m512 mn = w.has_min ? coef(w, blk, rec, g, 1) : _mm512_setzero_ps();
    // Unsigned int4 needs no bias correction; biased int8 carries 128 * sum(q_x).
    if (!kInt4) mn = _mm512_fmadd_ps(s, _mm512_set1_ps(-128.f), mn);
    for (int i = 0; i < 16; ++i) {
      const __m512 c = _mm512_cvtepi32_ps(_mm512_load_si512(cbuf + 16 * i));
      acc[i] = _mm512_fmadd_ps(c, _mm512_mul_ps(s, _mm512_set1_ps(xs[i * groups + g])), acc[i]);
      acc[i] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xb[i * groups + g]), acc[i]);
    }
  }
  const int64_t row0 = rb * kRowBlock;
  const int valid = static_cast<int>(w.n - row0 < 16 ? w.n - row0 : 16);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  for (int i = 0; i < 16 && t0 + i < a.t; ++i) _mm512_mask_storeu_ps(y + (t0 + i) * ldy + row0, mask, acc[i]);
}

void gemm_amx(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y, int64_t ldy) {
  if (a.t < kAmxMinTokens) return kernels_avx512().gemm(w, a, rb0, rb1, y, ldy);
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
  } else {
    const int64_t tblocks = (a.t + 15) / 16;
    const bool int4 = w.kind == WeightKind::Int4;
    for (int64_t rb = rb0; rb < rb1; ++rb)
      for (int64_t tb = 0; tb < tblocks; ++tb) {
        if (w.group == 16)
          int4 ? int_block<true, 16>(w, a, rb, 16 * tb, y, ldy) : int_block<false, 16>(w, a, rb, 16 * tb, y, ldy);
        else
          int4 ? int_block<true, 32>(w, a, rb, 16 * tb, y, ldy) : int_block<false, 32>(w, a, rb, 16 * tb, y, ldy);
      }
  }
  _tile_release();
}

bool prepare_amx(const PackedWeight& w, const float* x, int64_t t0, int64_t t1, int64_t ldx,
                 QuantActs* out) {
  return kernels_avx512().prepare(w, x, t0, t1, ldx, out);
}

}  // namespace

const LinearKernels& kernels_amx() {
  static const LinearKernels k{&prepare_amx, &gemm_amx};
  return k;
}

}  // namespace ktjax
