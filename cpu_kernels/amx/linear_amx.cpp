// AMX linear kernels for calls with enough tokens to fill tiles (prefill, busy experts).
// Dispatched only when detected_isa() is Amx (CPUID + OS tile state + the arch_prctl
// permission requested in isa.cpp); fewer tokens go to the AVX-512 kernels.
//
// Tiles use the packed layout as is: a group record of 16 rows is a VNNI-ordered B tile
// (int8: G/4 rows of 64 bytes; bf16: 16 rows of 64 bytes = 32 k). Activation rows are A
// tiles; QuantActs pads its rows to a multiple of 16 tokens, so tile loads stay in bounds.
//  * bf16: TDPBF16PS accumulates over all of K in the tile; C goes straight to y.
//  * int8 / int4: TDPBSUD (signed activations x biased unsigned weights) per group, then
//    the group's scales applied in AVX-512 registers, 16 token rows at a time.
#include <immintrin.h>

#include <cstring>

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

// Writes 16 token rows x 16 output rows from a float tile image to y, skipping padding.
void store_tile(const float* c, int64_t t0, int64_t t_end, int64_t row0, int64_t n, float* y,
                int64_t ldy) {
  const int valid = static_cast<int>(n - row0 < 16 ? n - row0 : 16);
  const __mmask16 mask = static_cast<__mmask16>((1u << valid) - 1);
  for (int i = 0; i < 16 && t0 + i < t_end; ++i)
    _mm512_mask_storeu_ps(y + (t0 + i) * ldy + row0, mask, _mm512_loadu_ps(c + 16 * i));
}

// bf16: tiles 0-3 = C (2 token blocks x 2 row blocks), 4-5 = A, 6-7 = B.
template <int NT, int NR>
void bf16_block(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t t0, float* y, int64_t ldy) {
  alignas(64) float cbuf[16 * 16];
  const int64_t groups = w.kp / 32, lda = a.kp * 2;
  _tile_zero(0);
  if (NR > 1) _tile_zero(1);
  if (NT > 1) _tile_zero(2);
  if (NT > 1 && NR > 1) _tile_zero(3);
  const uint8_t* b0 = w.block(rb0);
  const uint8_t* b1 = NR > 1 ? w.block(rb0 + 1) : b0;
  const uint16_t* x0 = a.bf.data() + t0 * a.kp;
  const uint16_t* x1 = x0 + 16 * a.kp;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t off = w.group_off(g);
    _tile_loadd(6, b0 + off, 64);
    if (NR > 1) _tile_loadd(7, b1 + off, 64);
    _tile_loadd(4, x0 + g * 32, lda);
    _tile_dpbf16ps(0, 4, 6);
    if (NR > 1) _tile_dpbf16ps(1, 4, 7);
    if (NT > 1) {
      _tile_loadd(5, x1 + g * 32, lda);
      _tile_dpbf16ps(2, 5, 6);
      if (NR > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  const int64_t n = w.n;
  auto flush = [&](int64_t tt, int64_t rb) {
    store_tile(cbuf, t0 + 16 * tt, a.t, (rb0 + rb) * kRowBlock, n, y, ldy);
  };
  _tile_stored(0, cbuf, 64);
  flush(0, 0);
  if (NR > 1) { _tile_stored(1, cbuf, 64); flush(0, 1); }
  if (NT > 1) { _tile_stored(2, cbuf, 64); flush(1, 0); }
  if (NT > 1 && NR > 1) { _tile_stored(3, cbuf, 64); flush(1, 1); }
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
    case ScaleEnc::None: break;
  }
  return _mm512_setzero_ps();
}

// int8 / int4, one token block x one row block: tile 0 = C, 1 = A, 2 = B.
template <bool kInt4, int G>
void int_block(const PackedWeight& w, const QuantActs& a, int64_t rb, int64_t t0, float* y, int64_t ldy) {
  alignas(64) int32_t cbuf[16 * 16];
  alignas(64) uint8_t bbuf[G * 16];
  const int64_t groups = w.kp / G;
  const uint8_t* blk = w.block(rb);
  const int8_t* x = a.q.data() + t0 * a.kp;
  const float* xs = a.scale.data() + t0 * groups;
  const float* xb = a.bsum.data() + t0 * groups;
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
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
    _tile_zero(0);
    _tile_loadd(1, x + g * G, a.kp);
    _tile_loadd(2, bsrc, 64);
    _tile_dpbsud(0, 1, 2);
    _tile_stored(0, cbuf, 64);
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
  if (w.kind == WeightKind::BF16) {
    for (int i = 0; i < 4; ++i) configure(i, 16, 64, &cfg);
    for (int i = 4; i < 8; ++i) configure(i, 16, 64, &cfg);
  } else {
    configure(0, 16, 64, &cfg);
    configure(1, 16, w.group, &cfg);
    configure(2, w.group / 4, 64, &cfg);
  }
  _tile_loadconfig(&cfg);
  const int64_t tblocks = (a.t + 15) / 16;
  if (w.kind == WeightKind::BF16) {
    for (int64_t rb = rb0; rb < rb1; rb += 2)
      for (int64_t tb = 0; tb < tblocks; tb += 2) {
        const bool two_r = rb + 1 < rb1, two_t = tb + 1 < tblocks;
        if (two_r && two_t) bf16_block<2, 2>(w, a, rb, 16 * tb, y, ldy);
        else if (two_r) bf16_block<1, 2>(w, a, rb, 16 * tb, y, ldy);
        else if (two_t) bf16_block<2, 1>(w, a, rb, 16 * tb, y, ldy);
        else bf16_block<1, 1>(w, a, rb, 16 * tb, y, ldy);
      }
  } else {
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

bool prepare_amx(const PackedWeight& w, const float* x, int64_t t, int64_t ldx, QuantActs* out) {
  return kernels_avx512().prepare(w, x, t, ldx, out);
}

}  // namespace

const LinearKernels& kernels_amx() {
  static const LinearKernels k{&prepare_amx, &gemm_amx};
  return k;
}

}  // namespace ktjax
