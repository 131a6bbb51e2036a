// Compiled with -ffp-contract=off (CMakeLists.txt): gguf's numpy reference rounds every
// multiply and add separately, so d * q - m must not become a fused multiply-add.
#include "cpu_kernels/quants/dequant.h"

#include <algorithm>
#include <cstring>

#include "cpu_kernels/quants/blocks.h"
#include "cpu_kernels/quants/float_bits.h"
#include "cpu_kernels/quants/iq_tables.h"
#include "cpu_kernels/thread_pool.h"

// Loops are written for the auto-vectoriser; each range function is cloned per ISA and
// picked at load time, so no AVX-512 instruction runs on a CPU without it.
#define KT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define KT_INLINE static inline __attribute__((always_inline))

// The 64-byte vector types below only pass between always-inlined functions, so the
// ABI note GCC gives for them in the non-AVX-512 clones does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace ktjax {
namespace {

// ---- one block -> block_size floats; operation order mirrors gguf/quants.py ----
// GCC vector extensions keep every kernel vectorised in each ISA clone (SSE2 splits the
// 64-byte vectors, AVX-512 uses them whole) with element-wise IEEE arithmetic.

using u8x16 = uint8_t __attribute__((vector_size(16)));
using u32x16 = uint32_t __attribute__((vector_size(64)));
using i32x16 = int32_t __attribute__((vector_size(64)));
using f32x16 = float __attribute__((vector_size(64)));

KT_INLINE u8x16 load_u8x16(const uint8_t* p) { u8x16 v; std::memcpy(&v, p, 16); return v; }
KT_INLINE i32x16 widen(u8x16 v) { return __builtin_convertvector(v, i32x16); }
KT_INLINE f32x16 to_f32(const i32x16& v) { return __builtin_convertvector(v, f32x16); }
KT_INLINE void store(float* y, const f32x16& v) { std::memcpy(y, &v, sizeof(v)); }
KT_INLINE uint32_t load_u32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

// Bits j .. j+15 of qh, each moved to bit 4 (the fifth bit of a Q5 quant).
KT_INLINE i32x16 fifth_bits(uint32_t qh, int j) {
  const u32x16 shift = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const u32x16 bits = (u32x16{} + qh) >> (shift + uint32_t(j));
  return __builtin_convertvector((bits & 1u) << 4, i32x16);
}

KT_INLINE void block_q4_0(const BlockQ4_0& b, float* y) {
  const float d = f16_to_f32(b.d);
  const u8x16 qs = load_u8x16(b.qs);
  store(y, d * to_f32(widen(qs & 0x0F) - 8));
  store(y + 16, d * to_f32(widen(qs >> 4) - 8));
}

KT_INLINE void block_q4_1(const BlockQ4_1& b, float* y) {
  const float d = f16_to_f32(b.d), m = f16_to_f32(b.m);
  const u8x16 qs = load_u8x16(b.qs);
  store(y, d * to_f32(widen(qs & 0x0F)) + m);
  store(y + 16, d * to_f32(widen(qs >> 4)) + m);
}

KT_INLINE void block_q5_0(const BlockQ5_0& b, float* y) {
  const float d = f16_to_f32(b.d);
  const uint32_t qh = load_u32(b.qh);
  const u8x16 qs = load_u8x16(b.qs);
  store(y, d * to_f32((widen(qs & 0x0F) | fifth_bits(qh, 0)) - 16));
  store(y + 16, d * to_f32((widen(qs >> 4) | fifth_bits(qh, 16)) - 16));
}

KT_INLINE void block_q5_1(const BlockQ5_1& b, float* y) {
  const float d = f16_to_f32(b.d), m = f16_to_f32(b.m);
  const uint32_t qh = load_u32(b.qh);
  const u8x16 qs = load_u8x16(b.qs);
  store(y, d * to_f32(widen(qs & 0x0F) | fifth_bits(qh, 0)) + m);
  store(y + 16, d * to_f32(widen(qs >> 4) | fifth_bits(qh, 16)) + m);
}

KT_INLINE void block_q8_0(const BlockQ8_0& b, float* y) {
  const float d = f16_to_f32(b.d);
  const auto* qs = reinterpret_cast<const uint8_t*>(b.qs);
  for (int h = 0; h < 2; ++h) {
    // int8 via the unsigned path: GCC widens u8 vectors well but not i8 ones.
    const i32x16 q = widen(load_u8x16(qs + 16 * h) ^ 0x80) - 128;
    store(y + 16 * h, to_f32(q) * d);
  }
}

// K-quants: every run of 16 outputs (a "sub-block") shares its scale (and min), so each
// kernel loops over sub-blocks and handles 16 quants at a time.

KT_INLINE void block_q2_k(const BlockQ2_K& b, float* y) {
  const float d = f16_to_f32(b.d), dmin = f16_to_f32(b.dmin);
  // Output h*128 + s*32 + l holds bits 2s..2s+1 of qs[h*32 + l].
  for (int sub = 0; sub < 16; ++sub) {
    const int h = sub / 8, s = (sub / 2) % 4, half = sub % 2;
    const float dl = d * static_cast<float>(b.scales[sub] & 0x0F);
    const float ml = dmin * static_cast<float>(b.scales[sub] >> 4);
    const u8x16 q = (load_u8x16(b.qs + h * 32 + half * 16) >> (2 * s)) & 3;
    store(y + sub * 16, dl * to_f32(widen(q)) - ml);
  }
}

KT_INLINE void block_q3_k(const BlockQ3_K& b, float* y) {
  const float d = f16_to_f32(b.d);
  // Two low bits as in Q2_K; the high bit of output e is bit e/32 of hmask[e % 32],
  // inverted (set means +0, clear means -4). Scales are 6-bit, biased by 32.
  for (int sub = 0; sub < 16; ++sub) {
    const int h = sub / 8, s = (sub / 2) % 4, half = sub % 2;
    const int lo = (b.scales[sub % 8] >> (4 * (sub / 8))) & 0x0F;
    const int hi = (b.scales[8 + sub % 4] >> (2 * (sub / 4))) & 0x03;
    const float dl = d * static_cast<float>((lo | (hi << 4)) - 32);
    const u8x16 low = (load_u8x16(b.qs + h * 32 + half * 16) >> (2 * s)) & 3;
    const u8x16 high = ((load_u8x16(b.hmask + half * 16) >> (h * 4 + s)) & 1) ^ 1;
    store(y + sub * 16, dl * to_f32(widen(low) - (widen(high) << 2)));
  }
}

// The 12 packed bytes of Q4_K / Q5_K hold 8 six-bit scales and 8 six-bit mins.
KT_INLINE void scale_min_k4(const uint8_t* s, int j, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
  }
}

// Q4_K / Q5_K: 8 groups of 32; group 2c takes the low nibbles of qs[32c .. 32c+31],
// group 2c+1 the high nibbles; Q5_K adds bit j of qh[l] as the fifth bit of group j.
template <bool kHasQh>
KT_INLINE void block_k4_k5(uint16_t d_bits, uint16_t dmin_bits, const uint8_t* scales,
                           const uint8_t* qh, const uint8_t* qs, float* y) {
  const float d = f16_to_f32(d_bits), dmin = f16_to_f32(dmin_bits);
  for (int j = 0; j < 8; ++j) {
    int sc, mn;
    scale_min_k4(scales, j, &sc, &mn);
    const float dl = d * static_cast<float>(sc);
    const float ml = dmin * static_cast<float>(mn);
    for (int half = 0; half < 2; ++half) {
      const u8x16 packed = load_u8x16(qs + (j / 2) * 32 + half * 16);
      u8x16 q = (j % 2) ? (packed >> 4) : (packed & 0x0F);
      if (kHasQh) q |= ((load_u8x16(qh + half * 16) >> j) & 1) << 4;
      store(y + j * 32 + half * 16, dl * to_f32(widen(q)) - ml);
    }
  }
}

KT_INLINE void block_q4_k(const BlockQ4_K& b, float* y) {
  block_k4_k5<false>(b.d, b.dmin, b.scales, nullptr, b.qs, y);
}

KT_INLINE void block_q5_k(const BlockQ5_K& b, float* y) {
  block_k4_k5<true>(b.d, b.dmin, b.scales, b.qh, b.qs, y);
}

KT_INLINE void block_q6_k(const BlockQ6_K& b, float* y) {
  const float d = f16_to_f32(b.d);
  // Output h*128 + s*32 + l: low nibble from ql[h*64 + (s%2)*32 + l] (the high nibble
  // for s >= 2), two high bits 2s..2s+1 of qh[h*32 + l]; biased by 32.
  for (int sub = 0; sub < 16; ++sub) {
    const int h = sub / 8, s = (sub / 2) % 4, half = sub % 2;
    const float dl = d * static_cast<float>(b.scales[sub]);
    const u8x16 ql = load_u8x16(b.ql + h * 64 + (s % 2) * 32 + half * 16);
    const u8x16 qh = load_u8x16(b.qh + h * 32 + half * 16);
    const u8x16 q = ((ql >> (4 * (s / 2))) & 0x0F) | (((qh >> (2 * s)) & 3) << 4);
    store(y + sub * 16, dl * to_f32(widen(q) - 32));
  }
}

// ---- IQ, ternary and MXFP4 types: scalar loops in gguf's order of operations ----
// Signs multiply as +-1.0f, as gguf does: x86 returns a NaN operand unchanged, so a NaN
// scale keeps its sign. Built from bits so that GCC cannot fold x * -1.0f into -x.

KT_INLINE float sign_of(uint8_t bits, int j) {
  return bits_f32(0x3f800000u | (uint32_t((bits >> j) & 1) << 31));
}
KT_INLINE uint16_t load_u16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

KT_INLINE void block_iq2_xxs(const BlockIQ2_XXS& b, float* y) {
  const float d = f16_to_f32(b.d);
  const auto* qs = reinterpret_cast<const uint8_t*>(b.qs);
  for (int ib = 0; ib < 8; ++ib) {  // 32 values: 4 grid bytes, then 4 x 7 sign bits + 4-bit scale
    const uint32_t aux1 = load_u32(qs + 8 * ib + 4);
    const float db = d * (0.5f + static_cast<float>(aux1 >> 28)) * 0.25f;
    for (int l = 0; l < 4; ++l) {
      const int8_t* g = kIq2xxsGrid[qs[8 * ib + l]];
      const uint8_t signs = kKsigns[(aux1 >> (7 * l)) & 127];
      for (int j = 0; j < 8; ++j) y[32 * ib + 8 * l + j] = db * static_cast<float>(g[j]) * sign_of(signs, j);
    }
  }
}

KT_INLINE void block_iq2_xs(const BlockIQ2_XS& b, float* y) {
  const float d = f16_to_f32(b.d);
  const auto* qs = reinterpret_cast<const uint8_t*>(b.qs);
  for (int i = 0; i < 32; ++i) {  // 8 values: 9-bit grid index, 7 sign bits; scale per 16
    const uint16_t q = load_u16(qs + 2 * i);
    const int ls = (b.scales[i / 4] >> (4 * ((i / 2) % 2))) & 15;
    const float db = d * (0.5f + static_cast<float>(ls)) * 0.25f;
    const int8_t* g = kIq2xsGrid[q & 511];
    const uint8_t signs = kKsigns[q >> 9];
    for (int j = 0; j < 8; ++j) y[8 * i + j] = db * static_cast<float>(g[j]) * sign_of(signs, j);
  }
}

KT_INLINE void block_iq2_s(const BlockIQ2_S& b, float* y) {
  const float d = f16_to_f32(b.d);
  for (int i = 0; i < 32; ++i) {  // 8 values: 10-bit grid index, a sign byte; scale per 16
    const int q = b.qs[i] | (((b.qh[i / 4] >> (2 * (i % 4))) & 3) << 8);
    const int ls = (b.scales[i / 4] >> (4 * ((i / 2) % 2))) & 15;
    const float db = d * (0.5f + static_cast<float>(ls)) * 0.25f;
    const int8_t* g = kIq2sGrid[q];
    for (int j = 0; j < 8; ++j) y[8 * i + j] = db * static_cast<float>(g[j]) * sign_of(b.signs[i], j);
  }
}

KT_INLINE void block_iq3_xxs(const BlockIQ3_XXS& b, float* y) {
  const float d = f16_to_f32(b.d);
  for (int ib = 0; ib < 8; ++ib) {  // 32 values: 8 grid bytes of 4; aux as in IQ2_XXS
    const uint32_t aux = load_u32(b.scales_signs + 4 * ib);
    const float db = d * (0.5f + static_cast<float>(aux >> 28)) * 0.5f;
    for (int l = 0; l < 4; ++l) {
      const uint8_t signs = kKsigns[(aux >> (7 * l)) & 127];
      for (int m = 0; m < 2; ++m) {
        const int8_t* g = kIq3xxsGrid[b.qs[8 * ib + 2 * l + m]];
        for (int t = 0; t < 4; ++t)
          y[32 * ib + 8 * l + 4 * m + t] = db * static_cast<float>(g[t]) * sign_of(signs, 4 * m + t);
      }
    }
  }
}

KT_INLINE void block_iq3_s(const BlockIQ3_S& b, float* y) {
  const float d = f16_to_f32(b.d);
  for (int i = 0; i < 64; ++i) {  // 4 values: 9-bit grid index; sign bits in order; scale per 32
    const int q = b.qs[i] | (((b.qh[i / 8] >> (i % 8)) & 1) << 8);
    const int ls = (b.scales[i / 16] >> (4 * ((i / 8) % 2))) & 15;
    const float db = d * static_cast<float>(1 + 2 * ls);
    const int8_t* g = kIq3sGrid[q];
    for (int t = 0; t < 4; ++t) {
      const int e = 4 * i + t;
      y[e] = db * static_cast<float>(g[t]) * sign_of(b.signs[e / 8], e % 8);
    }
  }
}

constexpr float kIq1Delta = 0.125f;

KT_INLINE void block_iq1_s(const BlockIQ1_S& b, float* y) {
  const float d = f16_to_f32(b.d);
  for (int ib = 0; ib < 8; ++ib) {  // 32 values: qh holds 4 x 3 index bits, scale, delta sign
    const uint16_t h = load_u16(reinterpret_cast<const uint8_t*>(b.qh) + 2 * ib);
    const float dl = d * static_cast<float>(2 * ((h >> 12) & 7) + 1);
    const float delta = (h & 0x8000) ? -kIq1Delta : kIq1Delta;
    for (int l = 0; l < 4; ++l) {
      const int8_t* g = kIq1sGrid[b.qs[4 * ib + l] | (((h >> (3 * l)) & 7) << 8)];
      for (int j = 0; j < 8; ++j) y[32 * ib + 8 * l + j] = dl * (static_cast<float>(g[j]) + delta);
    }
  }
}

KT_INLINE void block_iq1_m(const BlockIQ1_M& b, float* y) {
  uint16_t sc[4];
  std::memcpy(sc, b.scales, 8);
  const float d = f16_to_f32(iq1_m_d_bits(sc));
  for (int i = 0; i < 32; ++i) {  // 8 values: 11-bit grid index, delta sign per 8, scale per 16
    const int s = i / 2;
    const float dl = d * static_cast<float>(2 * ((sc[s / 4] >> (3 * (s % 4))) & 7) + 1);
    const int h = b.qh[i / 2] >> (4 * (i % 2));
    const float delta = (h & 8) ? -kIq1Delta : kIq1Delta;
    const int8_t* g = kIq1sGrid[b.qs[i] | ((h & 7) << 8)];
    for (int j = 0; j < 8; ++j) y[8 * i + j] = dl * (static_cast<float>(g[j]) + delta);
  }
}

// 32 values from 16 bytes of nibble indices into a 16-entry table (low nibbles first).
KT_INLINE void table_nibbles(const uint8_t* qs, const int8_t* table, float scale, float* y) {
  for (int j = 0; j < 16; ++j) {
    y[j] = scale * static_cast<float>(table[qs[j] & 15]);
    y[j + 16] = scale * static_cast<float>(table[qs[j] >> 4]);
  }
}

KT_INLINE void block_iq4_nl(const BlockIQ4_NL& b, float* y) {
  table_nibbles(b.qs, kIq4nlValues, f16_to_f32(b.d), y);
}

KT_INLINE void block_iq4_xs(const BlockIQ4_XS& b, float* y) {
  const float d = f16_to_f32(b.d);
  const uint16_t scales_h = b.scales_h;
  for (int ib = 0; ib < 8; ++ib) {
    const int ls = ((b.scales_l[ib / 2] >> (4 * (ib % 2))) & 15) | (((scales_h >> (2 * ib)) & 3) << 4);
    table_nibbles(b.qs + 16 * ib, kIq4nlValues, d * static_cast<float>(ls - 32), y + 32 * ib);
  }
}

KT_INLINE void block_mxfp4(const BlockMXFP4& b, float* y) {
  table_nibbles(b.qs, kMxfp4Values, e8m0_half_to_f32(b.e), y);
}

KT_INLINE void block_tq1_0(const BlockTQ1_0& b, float* y) {
  const float d = f16_to_f32(b.d);
  static constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};
  // A byte holds trits as a base-3 fixed-point fraction: trit p is the top "digit" of
  // byte * 3^p (mod 256), read as (x * 3) >> 8.
  auto trit = [](uint8_t byte, int p) {
    const uint8_t x = static_cast<uint8_t>(byte * kPow3[p]);
    return static_cast<float>(((x * 3) >> 8) - 1);
  };
  for (int p = 0; p < 5; ++p)
    for (int i = 0; i < 32; ++i) y[32 * p + i] = d * trit(b.qs[i], p);
  for (int p = 0; p < 5; ++p)
    for (int i = 0; i < 16; ++i) y[160 + 16 * p + i] = d * trit(b.qs[32 + i], p);
  for (int p = 0; p < 4; ++p)
    for (int i = 0; i < 4; ++i) y[240 + 4 * p + i] = d * trit(b.qh[i], p);
}

KT_INLINE void block_tq2_0(const BlockTQ2_0& b, float* y) {
  const float d = f16_to_f32(b.d);
  for (int h = 0; h < 2; ++h)
    for (int s = 0; s < 4; ++s)
      for (int l = 0; l < 32; ++l)
        y[128 * h + 32 * s + l] = d * static_cast<float>(((b.qs[32 * h + l] >> (2 * s)) & 3) - 1);
}

// ---- ranges: `count` blocks from src into dst ----

using RangeFn = void (*)(const uint8_t* __restrict src, float* __restrict dst, int64_t count);

KT_CLONES void range_f32(const uint8_t* __restrict src, float* __restrict dst, int64_t count) {
  std::memcpy(dst, src, static_cast<size_t>(count) * 4);
}

KT_CLONES void range_f16(const uint8_t* __restrict src, float* __restrict dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = f16_to_f32(h);
  }
}

KT_CLONES void range_bf16(const uint8_t* __restrict src, float* __restrict dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, 2);
    dst[i] = bf16_to_f32(h);
  }
}

#define KT_BLOCK_RANGE(NAME, BLOCK, KERNEL, QK)                          \
  KT_CLONES void NAME(const uint8_t* __restrict src, float* __restrict dst, int64_t count) {   \
    const BLOCK* x = reinterpret_cast<const BLOCK*>(src);                \
    for (int64_t i = 0; i < count; ++i) KERNEL(x[i], dst + i * (QK));    \
  }

KT_BLOCK_RANGE(range_q4_0, BlockQ4_0, block_q4_0, QK4_0)
KT_BLOCK_RANGE(range_q4_1, BlockQ4_1, block_q4_1, QK4_1)
KT_BLOCK_RANGE(range_q5_0, BlockQ5_0, block_q5_0, QK5_0)
KT_BLOCK_RANGE(range_q5_1, BlockQ5_1, block_q5_1, QK5_1)
KT_BLOCK_RANGE(range_q8_0, BlockQ8_0, block_q8_0, QK8_0)
KT_BLOCK_RANGE(range_q2_k, BlockQ2_K, block_q2_k, QK_K)
KT_BLOCK_RANGE(range_q3_k, BlockQ3_K, block_q3_k, QK_K)
KT_BLOCK_RANGE(range_q4_k, BlockQ4_K, block_q4_k, QK_K)
KT_BLOCK_RANGE(range_q5_k, BlockQ5_K, block_q5_k, QK_K)
KT_BLOCK_RANGE(range_q6_k, BlockQ6_K, block_q6_k, QK_K)
KT_BLOCK_RANGE(range_iq2_xxs, BlockIQ2_XXS, block_iq2_xxs, QK_K)
KT_BLOCK_RANGE(range_iq2_xs, BlockIQ2_XS, block_iq2_xs, QK_K)
KT_BLOCK_RANGE(range_iq2_s, BlockIQ2_S, block_iq2_s, QK_K)
KT_BLOCK_RANGE(range_iq3_xxs, BlockIQ3_XXS, block_iq3_xxs, QK_K)
KT_BLOCK_RANGE(range_iq3_s, BlockIQ3_S, block_iq3_s, QK_K)
KT_BLOCK_RANGE(range_iq1_s, BlockIQ1_S, block_iq1_s, QK_K)
KT_BLOCK_RANGE(range_iq1_m, BlockIQ1_M, block_iq1_m, QK_K)
KT_BLOCK_RANGE(range_iq4_nl, BlockIQ4_NL, block_iq4_nl, QK4_NL)
KT_BLOCK_RANGE(range_iq4_xs, BlockIQ4_XS, block_iq4_xs, QK_K)
KT_BLOCK_RANGE(range_tq1_0, BlockTQ1_0, block_tq1_0, QK_K)
KT_BLOCK_RANGE(range_tq2_0, BlockTQ2_0, block_tq2_0, QK_K)
KT_BLOCK_RANGE(range_mxfp4, BlockMXFP4, block_mxfp4, QK_MXFP4)
#undef KT_BLOCK_RANGE

KT_CLONES void f32_to_bf16_range(const float* src, uint16_t* dst, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = f32_to_bf16(src[i]);
}

struct Entry {
  QuantFormat format;
  RangeFn range;
};

const Entry kEntries[] = {
    {{0, 1, 4}, range_f32},            // F32
    {{1, 1, 2}, range_f16},            // F16
    {{30, 1, 2}, range_bf16},          // BF16
    {{2, QK4_0, sizeof(BlockQ4_0)}, range_q4_0},
    {{3, QK4_1, sizeof(BlockQ4_1)}, range_q4_1},
    {{6, QK5_0, sizeof(BlockQ5_0)}, range_q5_0},
    {{7, QK5_1, sizeof(BlockQ5_1)}, range_q5_1},
    {{8, QK8_0, sizeof(BlockQ8_0)}, range_q8_0},
    {{10, QK_K, sizeof(BlockQ2_K)}, range_q2_k},
    {{11, QK_K, sizeof(BlockQ3_K)}, range_q3_k},
    {{12, QK_K, sizeof(BlockQ4_K)}, range_q4_k},
    {{13, QK_K, sizeof(BlockQ5_K)}, range_q5_k},
    {{14, QK_K, sizeof(BlockQ6_K)}, range_q6_k},
    {{16, QK_K, sizeof(BlockIQ2_XXS)}, range_iq2_xxs},
    {{17, QK_K, sizeof(BlockIQ2_XS)}, range_iq2_xs},
    {{18, QK_K, sizeof(BlockIQ3_XXS)}, range_iq3_xxs},
    {{19, QK_K, sizeof(BlockIQ1_S)}, range_iq1_s},
    {{20, QK4_NL, sizeof(BlockIQ4_NL)}, range_iq4_nl},
    {{21, QK_K, sizeof(BlockIQ3_S)}, range_iq3_s},
    {{22, QK_K, sizeof(BlockIQ2_S)}, range_iq2_s},
    {{23, QK_K, sizeof(BlockIQ4_XS)}, range_iq4_xs},
    {{29, QK_K, sizeof(BlockIQ1_M)}, range_iq1_m},
    {{34, QK_K, sizeof(BlockTQ1_0)}, range_tq1_0},
    {{35, QK_K, sizeof(BlockTQ2_0)}, range_tq2_0},
    {{39, QK_MXFP4, sizeof(BlockMXFP4)}, range_mxfp4},
};

const Entry* find_entry(int type) {
  for (const Entry& e : kEntries)
    if (e.format.type == type) return &e;
  return nullptr;
}

// Below this many output elements, waking the pool costs more than it saves.
constexpr int64_t kParallelMinElements = int64_t{1} << 16;

template <typename Fn>
void over_blocks(const QuantFormat& f, int64_t n_blocks, const Fn& fn) {
  if (n_blocks * f.block_size < kParallelMinElements) {
    fn(0, n_blocks);
  } else {
    parallel_for(n_blocks, fn);
  }
}

}  // namespace

const QuantFormat* find_quant_format(int type) {
  const Entry* e = find_entry(type);
  return e ? &e->format : nullptr;
}

void dequantize_f32(int type, const uint8_t* src, int64_t n_blocks, float* dst) {
  const Entry& e = *find_entry(type);
  const QuantFormat& f = e.format;
  over_blocks(f, n_blocks, [&](int64_t begin, int64_t end) {
    e.range(src + begin * f.type_size, dst + begin * f.block_size, end - begin);
  });
}

void dequantize_bf16(int type, const uint8_t* src, int64_t n_blocks, uint16_t* dst) {
  const Entry& e = *find_entry(type);
  const QuantFormat& f = e.format;
  // Go through a small float buffer that stays in L1 instead of a full float32 copy.
  constexpr int64_t kTile = 4096;  // a multiple of every block size
  over_blocks(f, n_blocks, [&](int64_t begin, int64_t end) {
    float tile[kTile];
    const int64_t step = kTile / f.block_size;
    for (int64_t b = begin; b < end; b += step) {
      const int64_t count = std::min(step, end - b);
      e.range(src + b * f.type_size, tile, count);
      f32_to_bf16_range(tile, dst + b * f.block_size, count * f.block_size);
    }
  });
}

}  // namespace ktjax
