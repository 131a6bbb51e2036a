// Packing of GGUF blocks and float matrices into PackedWeight (see packed.h).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <utility>
#include <vector>

#include "cpu_kernels/formats/packed.h"
#include "cpu_kernels/quants/blocks.h"
#include "cpu_kernels/quants/float_bits.h"
#include "cpu_kernels/quants/ggml_types.h"
#include "cpu_kernels/quants/iq_groups.h"
#include "cpu_kernels/numa.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {

void AlignedFree::operator()(void* p) const { std::free(p); }

int PackedWeight::scale_bytes() const {
  switch (scale_enc) {
    case ScaleEnc::F16: return 2;
    case ScaleEnc::F32: return 4;
    case ScaleEnc::I8:
    case ScaleEnc::E8M0: return 1;
    case ScaleEnc::Row:  // no per-group coefficients
    case ScaleEnc::None: return 0;
  }
  return 0;
}

std::string PackedWeight::describe() const {
  static const char* kinds[] = {"int8", "int4", "bf16"};
  static const char* encs[] = {"", "f16", "f32", "i8xf32", "row", "e8m0"};
  std::string s = kind == WeightKind::Int4 ? (lut ? "int4lut" : "int" + std::to_string(4 + hi_bits))
                                           : kinds[static_cast<int>(kind)];
  if (kind != WeightKind::BF16) {
    s += "/g" + std::to_string(group) + "/" + encs[static_cast<int>(scale_enc)];
    if (has_min) s += "+min";
  }
  return s;
}

namespace {

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// f32 -> f16 bits, round to nearest even; overflow gives inf.
uint16_t f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (x >= 0x477ff000u) return sign | 0x7c00u;
  if (x < 0x38800000u)  // below the smallest normal half: multiples of 2^-24
    return sign | static_cast<uint16_t>(std::nearbyint(bits_f32(x) * 16777216.0f));
  x += 0xfffu + ((x >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((x - 0x38000000u) >> 13));
}

bool f16_exact(float f) { return f16_to_f32(f32_to_f16(f)) == f; }

// round(v / s) clamped to [lo, hi], through the reciprocal inv = 1/s (0 when s is 0), or by
// division where 1/s overflows (a subnormal s, from a crafted file's tiny weights). Clamped
// before the cast, which is undefined for a float past int's range.
inline int quantize(float v, float s, float inv, int lo, int hi) {
  const float q = std::nearbyint(std::isfinite(inv) ? v * inv : v / s);
  return static_cast<int>(std::min<float>(static_cast<float>(hi), std::max<float>(static_cast<float>(lo), q)));
}

// Byte offset of element (r in block, k) inside a row-block region.
inline int64_t data_offset(const PackedWeight& w, int r, int64_t k) {
  if (w.kind == WeightKind::BF16) return (k / 2) * 64 + r * 4 + (k % 2) * 2;
  const int64_t g = k / w.group, kk = k % w.group, quad = kk / 4, j = kk % 4;
  const int64_t chunk = w.kind == WeightKind::Int8 ? quad : quad / 2;
  return w.group_off(g) + chunk * 64 + r * 4 + j;
}

// Byte holding bit 4 + b of element (r in block, k) in plane b, and that bit's position.
inline std::pair<int64_t, int> plane_bit(const PackedWeight& w, int r, int64_t k, int b) {
  const int64_t kk = k % w.group, i = (kk / 4) * 64 + r * 4 + kk % 4;  // bit i of the group's planes
  return {w.group_off(k / w.group) + plane_offset(w.group, b) + i / 8, static_cast<int>(i % 8)};
}

// Stores q (int8: -128..127; int4: 0..2^(4 + hi_bits) - 1) at (n, k).
inline void set_q(PackedWeight& w, int64_t n, int64_t k, int q) {
  uint8_t* blk = w.block(n / kRowBlock);
  const int r = static_cast<int>(n % kRowBlock);
  uint8_t* p = blk + data_offset(w, r, k);
  if (w.kind == WeightKind::Int8) {
    *p = static_cast<uint8_t>(q + 128);
    return;
  }
  const bool hi = ((k % w.group) / 4) % 2;
  const int nib = q & 0x0f;
  *p = hi ? static_cast<uint8_t>((*p & 0x0f) | (nib << 4)) : static_cast<uint8_t>((*p & 0xf0) | nib);
  for (int b = 0; b < w.hi_bits; ++b) {
    const auto [off, bit] = plane_bit(w, r, k, b);
    blk[off] = static_cast<uint8_t>((blk[off] & ~(1 << bit)) | (((q >> (4 + b)) & 1) << bit));
  }
}

inline int get_q(const PackedWeight& w, int64_t n, int64_t k) {
  const uint8_t* blk = w.block(n / kRowBlock);
  const int r = static_cast<int>(n % kRowBlock);
  const uint8_t v = blk[data_offset(w, r, k)];
  if (w.kind == WeightKind::Int8) return static_cast<int>(v) - 128;
  int q = ((k % w.group) / 4) % 2 ? v >> 4 : v & 0x0f;
  for (int b = 0; b < w.hi_bits; ++b) {
    const auto [off, bit] = plane_bit(w, r, k, b);
    q |= ((blk[off] >> bit) & 1) << (4 + b);
  }
  return q;
}

// Scale or min slot (which = 0 / 1) of (n, group g), as raw bytes of the encoding.
inline uint8_t* scale_slot(PackedWeight& w, int which, int64_t n, int64_t g) {
  return w.block(n / kRowBlock) + w.group_off(g) + w.group_bytes + which * w.coef_bytes +
         (n % kRowBlock) * w.scale_bytes();
}

// f32 super scale or min (which = 0 / 1) of row n for the super-block holding value k.
inline float* super_slot(PackedWeight& w, int which, int64_t n, int64_t k) {
  return reinterpret_cast<float*>(w.block(n / kRowBlock) + w.super_off(k / w.group) + which * 64) +
         n % kRowBlock;
}

// Direct (F16/F32) scale or min.
void set_direct(PackedWeight& w, int which, int64_t n, int64_t g, float v) {
  uint8_t* p = scale_slot(w, which, n, g);
  if (w.scale_enc == ScaleEnc::F16) {
    const uint16_t h = f32_to_f16(v);
    std::memcpy(p, &h, 2);
  } else {
    std::memcpy(p, &v, 4);
  }
}

float group_coef(const PackedWeight& w, int which, int64_t n, int64_t k) {
  PackedWeight& mw = const_cast<PackedWeight&>(w);
  const uint8_t* p = scale_slot(mw, which, n, k / w.group);
  switch (w.scale_enc) {
    case ScaleEnc::F16: { uint16_t h; std::memcpy(&h, p, 2); return f16_to_f32(h); }
    case ScaleEnc::F32: { float f; std::memcpy(&f, p, 4); return f; }
    case ScaleEnc::I8: return *super_slot(mw, which, n, k) * static_cast<float>(static_cast<int8_t>(*p));
    case ScaleEnc::Row: return *super_slot(mw, which, n, k);
    case ScaleEnc::E8M0: return e8m0_half_to_f32(*p);
    case ScaleEnc::None: break;
  }
  return 0.f;
}

template <class Block>
const Block* row_blocks(const uint8_t* raw, int64_t n, int64_t blocks_per_row) {
  return reinterpret_cast<const Block*>(raw) + n * blocks_per_row;
}

// 6-bit scale and min j of a Q4_K / Q5_K block (ggml get_scale_min_k4).
inline void scale_min_k4(int j, const uint8_t* q, int* sc, int* m) {
  if (j < 4) {
    *sc = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *sc = (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4);
    *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

// Fills w row n from GGUF blocks; types that use the I8 (K-quant) encoding.
void pack_kquant_row(PackedWeight& w, int type, const uint8_t* raw, int64_t n) {
  const int64_t nb = w.k / QK_K;
  auto put_scales = [&](int64_t s, int sub, int sc, int m) {
    const int64_t g = s * (QK_K / w.group) + sub;
    *reinterpret_cast<int8_t*>(scale_slot(w, 0, n, g)) = static_cast<int8_t>(sc);
    if (w.has_min) *reinterpret_cast<int8_t*>(scale_slot(w, 1, n, g)) = static_cast<int8_t>(m);
  };
  for (int64_t s = 0; s < nb; ++s) {
    const int64_t k0 = s * QK_K;
    switch (static_cast<GgmlType>(type)) {
      case GgmlType::Q4_K: {
        const BlockQ4_K& b = row_blocks<BlockQ4_K>(raw, n, nb)[s];
        *super_slot(w, 0, n, k0) = f16_to_f32(b.d);
        *super_slot(w, 1, n, k0) = -f16_to_f32(b.dmin);
        for (int j = 0; j < 8; ++j) {
          int sc, m;
          scale_min_k4(j, b.scales, &sc, &m);
          put_scales(s, j, sc, m);
          for (int l = 0; l < 32; ++l)
            set_q(w, n, k0 + 32 * j + l, (b.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xf);
        }
        break;
      }
      case GgmlType::Q5_K: {
        const BlockQ5_K& b = row_blocks<BlockQ5_K>(raw, n, nb)[s];
        *super_slot(w, 0, n, k0) = f16_to_f32(b.d);
        *super_slot(w, 1, n, k0) = -f16_to_f32(b.dmin);
        for (int j = 0; j < 8; ++j) {
          int sc, m;
          scale_min_k4(j, b.scales, &sc, &m);
          put_scales(s, j, sc, m);
          for (int l = 0; l < 32; ++l) {
            const int lo = (b.qs[32 * (j / 2) + l] >> (4 * (j % 2))) & 0xf;
            const int hi = (b.qh[l] >> j) & 1;
            set_q(w, n, k0 + 32 * j + l, lo | (hi << 4));
          }
        }
        break;
      }
      case GgmlType::Q6_K: {
        // q in 0..63 stored as is with min = -32 * scale: super min -32d, same int8 factor.
        const BlockQ6_K& b = row_blocks<BlockQ6_K>(raw, n, nb)[s];
        const float d = f16_to_f32(b.d);
        *super_slot(w, 0, n, k0) = d;
        *super_slot(w, 1, n, k0) = -32.0f * d;
        for (int j = 0; j < 16; ++j) put_scales(s, j, b.scales[j], b.scales[j]);
        for (int half = 0; half < 2; ++half) {
          const uint8_t* ql = b.ql + 64 * half;
          const uint8_t* qh = b.qh + 32 * half;
          const int64_t e = k0 + 128 * half;
          for (int l = 0; l < 32; ++l) {
            set_q(w, n, e + l, (ql[l] & 0xf) | (((qh[l] >> 0) & 3) << 4));
            set_q(w, n, e + l + 32, (ql[l + 32] & 0xf) | (((qh[l] >> 2) & 3) << 4));
            set_q(w, n, e + l + 64, (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
            set_q(w, n, e + l + 96, (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
          }
        }
        break;
      }
      case GgmlType::Q3_K: {
        // q in -4..3 stored as q + 4 with min = -4 * scale: super min -4d, same int8 factor.
        const BlockQ3_K& b = row_blocks<BlockQ3_K>(raw, n, nb)[s];
        const float d = f16_to_f32(b.d);
        *super_slot(w, 0, n, k0) = d;
        *super_slot(w, 1, n, k0) = -4.0f * d;
        for (int i = 0; i < 16; ++i) {
          const int lo = (b.scales[i % 8] >> (4 * (i / 8))) & 0xf;
          const int hi = (b.scales[8 + i % 4] >> (2 * (i / 4))) & 3;
          const int sc = (lo | (hi << 4)) - 32;
          put_scales(s, i, sc, sc);
        }
        for (int e = 0; e < QK_K; ++e) {
          const int ql = (b.qs[(e / 128) * 32 + e % 32] >> (2 * ((e / 32) % 4))) & 3;
          const int h = (b.hmask[e % 32] >> (e / 32)) & 1;
          set_q(w, n, k0 + e, ql - 4 * (1 - h) + 4);
        }
        break;
      }
      case GgmlType::Q2_K: {
        const BlockQ2_K& b = row_blocks<BlockQ2_K>(raw, n, nb)[s];
        *super_slot(w, 0, n, k0) = f16_to_f32(b.d);
        *super_slot(w, 1, n, k0) = -f16_to_f32(b.dmin);
        for (int i = 0; i < 16; ++i) put_scales(s, i, b.scales[i] & 0xf, b.scales[i] >> 4);
        for (int e = 0; e < QK_K; ++e)
          set_q(w, n, k0 + e, (b.qs[(e / 128) * 32 + e % 32] >> (2 * ((e / 32) % 4))) & 3);
        break;
      }
      default:
        throw std::logic_error("pack_kquant_row: not a K-quant type");
    }
  }
}

// Types with one 32-value block per group and f16 d (and m).
void pack_legacy_row(PackedWeight& w, int type, const uint8_t* raw, int64_t n) {
  const int64_t nb = w.k / 32;
  for (int64_t g = 0; g < nb; ++g) {
    const int64_t k0 = g * 32;
    switch (static_cast<GgmlType>(type)) {
      case GgmlType::Q8_0: {
        const BlockQ8_0& b = row_blocks<BlockQ8_0>(raw, n, nb)[g];
        set_direct(w, 0, n, g, f16_to_f32(b.d));
        for (int l = 0; l < 32; ++l) set_q(w, n, k0 + l, b.qs[l]);
        break;
      }
      case GgmlType::Q4_0: {
        const BlockQ4_0& b = row_blocks<BlockQ4_0>(raw, n, nb)[g];
        const float d = f16_to_f32(b.d);
        set_direct(w, 0, n, g, d);
        set_direct(w, 1, n, g, -8.0f * d);
        for (int l = 0; l < 16; ++l) {
          set_q(w, n, k0 + l, b.qs[l] & 0xf);
          set_q(w, n, k0 + l + 16, b.qs[l] >> 4);
        }
        break;
      }
      case GgmlType::Q4_1: {
        const BlockQ4_1& b = row_blocks<BlockQ4_1>(raw, n, nb)[g];
        set_direct(w, 0, n, g, f16_to_f32(b.d));
        set_direct(w, 1, n, g, f16_to_f32(b.m));
        for (int l = 0; l < 16; ++l) {
          set_q(w, n, k0 + l, b.qs[l] & 0xf);
          set_q(w, n, k0 + l + 16, b.qs[l] >> 4);
        }
        break;
      }
      case GgmlType::Q5_0:
      case GgmlType::Q5_1: {
        const bool q51 = static_cast<GgmlType>(type) == GgmlType::Q5_1;
        const uint8_t* qs;
        uint32_t qh;
        if (q51) {
          const BlockQ5_1& b = row_blocks<BlockQ5_1>(raw, n, nb)[g];
          set_direct(w, 0, n, g, f16_to_f32(b.d));
          set_direct(w, 1, n, g, f16_to_f32(b.m));
          std::memcpy(&qh, b.qh, 4);
          qs = b.qs;
        } else {
          const BlockQ5_0& b = row_blocks<BlockQ5_0>(raw, n, nb)[g];
          const float d = f16_to_f32(b.d);
          set_direct(w, 0, n, g, d);
          set_direct(w, 1, n, g, -16.0f * d);  // q - 16 as q with a min
          std::memcpy(&qh, b.qh, 4);
          qs = b.qs;
        }
        for (int l = 0; l < 16; ++l) {
          set_q(w, n, k0 + l, (qs[l] & 0xf) | (((qh >> l) & 1) << 4));
          set_q(w, n, k0 + l + 16, (qs[l] >> 4) | (((qh >> (l + 16)) & 1) << 4));
        }
        break;
      }
      default:
        throw std::logic_error("pack_legacy_row: unsupported type");
    }
  }
}

struct TypeInfo {
  GgmlType type;
  int block, bytes;
  WeightKind kind;
  int group;
  bool kquant, has_min;
  int hi_bits;
};

// 5- and 6-bit types keep their width (int4 + bit planes): as int8 they read 1.4-1.5x (Q5_*)
// and 1.2x (Q6_K) the bytes, which bandwidth-bound decode pays for; prefill recovers the
// planes' cost by unpacking them once per token block (gemm_body.h, unpack_min_tiles).
// Figures against int8: docs/kernel-notes.md#bit-planes.
const TypeInfo kTypes[] = {
    {GgmlType::Q8_0, 32, 34, WeightKind::Int8, 32, false, false, 0},
    {GgmlType::Q4_0, 32, 18, WeightKind::Int4, 32, false, true, 0},
    {GgmlType::Q4_1, 32, 20, WeightKind::Int4, 32, false, true, 0},
    {GgmlType::Q5_0, 32, 22, WeightKind::Int4, 32, false, true, 1},
    {GgmlType::Q5_1, 32, 24, WeightKind::Int4, 32, false, true, 1},
    {GgmlType::Q2_K, 256, 84, WeightKind::Int4, 16, true, true, 0},
    {GgmlType::Q3_K, 256, 110, WeightKind::Int4, 16, true, true, 0},
    {GgmlType::Q4_K, 256, 144, WeightKind::Int4, 32, true, true, 0},
    {GgmlType::Q5_K, 256, 176, WeightKind::Int4, 32, true, true, 1},
    {GgmlType::Q6_K, 256, 210, WeightKind::Int4, 16, true, true, 2},
};

// row(r) for rows [0, n) over the pool, each row block in one task: the rows of a block
// share bytes (a bit-plane byte holds bits of two rows).
void by_row_blocks(int64_t n, const std::function<void(int64_t)>& row) {
  parallel_for((n + kRowBlock - 1) / kRowBlock, [&](int64_t b, int64_t e) {
    for (int64_t r = b * kRowBlock; r < std::min(n, e * kRowBlock); ++r) row(r);
  });
}

// a * b, or std::invalid_argument naming `what` when the product passes int64 (a crafted
// shape must not wrap around to a small size that a short buffer then passes).
int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t out = 0;
  if (__builtin_mul_overflow(a, b, &out))
    throw std::invalid_argument(std::string(what) + " overflows: " + std::to_string(a) + " x " +
                                std::to_string(b));
  return out;
}

// Positive, and small enough that every size make_packed derives (padded to row blocks and
// super-blocks, times the bytes per value) stays far inside int64.
void check_shape(int64_t n, int64_t k) {
  constexpr int64_t kMaxDim = int64_t{1} << 40;
  if (n <= 0 || k <= 0 || n > kMaxDim || k > kMaxDim)
    throw std::invalid_argument("weight shape must be positive and below 2^40, got (" +
                                std::to_string(n) + ", " + std::to_string(k) + ")");
  checked_mul(n, k, "weight shape (n x k)");
}

// IQ / ternary / MXFP4 types, exact, one scale per group of 32 (IQ2_XS, IQ2_S, IQ1_M: 16)
// (iq_groups.h): int4 indices into the type's 16-entry table; scales in the K-quant encoding
// (int8 per group, f32 per 256) where they are small integers times the block's d, else
// f16 (IQ4_NL) or MXFP4's own exponent bytes (E8M0).
std::unique_ptr<PackedWeight> pack_iq(const uint8_t* raw, size_t raw_bytes, int ggml_type,
                                      const IqGroupFormat& f, int64_t n, int64_t k) {
  if (k % f.block != 0)
    throw std::invalid_argument(ggml_type_label(ggml_type) + " rows need K % " + std::to_string(f.block) +
                                " == 0, got K=" + std::to_string(k));
  const int64_t row_bytes = (k / f.block) * f.bytes;
  const int64_t need = checked_mul(n, row_bytes, "weight bytes");
  if (raw_bytes != static_cast<size_t>(need))
    throw std::invalid_argument("GGUF " + ggml_type_label(ggml_type) + " tensor of shape (" + std::to_string(n) +
                                ", " + std::to_string(k) + ") needs " + std::to_string(need) + " bytes, got " +
                                std::to_string(raw_bytes));
  const int8_t* table = iq_group_table(ggml_type);
  int mult;
  float factor;
  const bool i8_scales = f.block == kSuperBlock && iq_group_int_scale(ggml_type, raw, 0, &mult, &factor);
  const bool mxfp4 = static_cast<GgmlType>(ggml_type) == GgmlType::MXFP4;
  const ScaleEnc enc = i8_scales ? ScaleEnc::I8 : mxfp4 ? ScaleEnc::E8M0 : f.f16_scale ? ScaleEnc::F16 : ScaleEnc::F32;
  const int G = f.group;
  auto w = make_packed(WeightKind::Int4, enc, false, G, n, k);
  w->source_type = ggml_type;
  w->lut = true;
  for (int i = 0; i < 16; ++i) w->lut_biased[i] = static_cast<uint8_t>(table[i] + 128);
  PackedWeight& ref = *w;
  const int groups_per_block = f.block / G;
  by_row_blocks(n, [&](int64_t r) {
    const uint8_t* row = raw + r * row_bytes;
    for (int64_t g = 0; g < k / G; ++g) {
      uint8_t idx[32];
      float scale;
      const uint8_t* blk = row + (g / groups_per_block) * f.bytes;
      const int sub = static_cast<int>(g % groups_per_block);
      iq_group_indices(ggml_type, blk, sub, idx, &scale);
      if (i8_scales) {
        int m;
        float d;
        iq_group_int_scale(ggml_type, blk, sub, &m, &d);
        *super_slot(ref, 0, r, g * G) = d;
        *reinterpret_cast<int8_t*>(scale_slot(ref, 0, r, g)) = static_cast<int8_t>(m);
      } else if (mxfp4) {
        *scale_slot(ref, 0, r, g) = reinterpret_cast<const BlockMXFP4*>(blk)->e;
      } else {
        set_direct(ref, 0, r, g, scale);
      }
      for (int l = 0; l < G; ++l) set_q(ref, r, g * G + l, idx[l]);
    }
  });
  return w;
}

}  // namespace

std::unique_ptr<PackedWeight> make_packed(WeightKind kind, ScaleEnc enc, bool has_min,
                                          int group, int64_t n, int64_t k, int hi_bits, bool fill) {
  check_shape(n, k);
  // The layouts the kernels are built for: int8 in groups of 32; int4 in groups of 16 or 32
  // (with a table: the IQ types),
  // 6-bit (2 planes) in groups of 16 (Q6_K), 5-bit (1 plane) in groups of 32 (Q5_*).
  const bool built = kind == WeightKind::BF16 || (kind == WeightKind::Int8 && group == 32 && hi_bits == 0) ||
                     (kind == WeightKind::Int4 && (group == 16 || group == 32) &&
                      (hi_bits == 0 || hi_bits == (group == 32 ? 1 : 2)));
  if (!built)
    throw std::logic_error("make_packed: no kernels for kind " + std::to_string(static_cast<int>(kind)) +
                           " in groups of " + std::to_string(group) + " with " + std::to_string(hi_bits) + " bit planes");
  auto w = std::make_unique<PackedWeight>();
  w->hi_bits = hi_bits;
  w->kind = kind;
  w->scale_enc = kind == WeightKind::BF16 ? ScaleEnc::None : enc;
  w->has_min = kind != WeightKind::BF16 && has_min;
  w->group = kind == WeightKind::BF16 ? 32 : group;
  w->n = n;
  w->k = k;
  w->np = round_up(n, kRowBlock);
  const bool i8 = w->scale_enc == ScaleEnc::I8, row = w->scale_enc == ScaleEnc::Row;
  w->kp = round_up(k, i8 ? kSuperBlock : row ? 64 : w->group);
  w->group_bytes = kind == WeightKind::Int4 ? plane_offset(w->group, hi_bits)
                  : kind == WeightKind::Int8 ? w->group * 16
                                             : 32 * 2 * 16;
  w->coef_bytes = w->scale_bytes() * kRowBlock;
  w->rec_bytes = w->group_bytes + w->coef_bytes * (w->has_min ? 2 : 1);
  w->super_hdr = i8 || row ? 64 * (w->has_min ? 2 : 1) : 0;
  if (row) {  // one super-block: g >> gps_shift is 0 for every group
    w->gps_shift = 62;
    w->super_bytes = w->super_hdr + w->groups() * w->rec_bytes;
    w->block_stride = round_up(w->super_bytes, 64);
  } else {
    w->gps_shift = i8 ? (w->group == 16 ? 4 : 3) : 0;
    w->super_bytes = w->super_hdr + (int64_t{1} << w->gps_shift) * w->rec_bytes;
    w->block_stride = round_up((w->groups() >> w->gps_shift) * w->super_bytes, 64);
  }
  const size_t total = static_cast<size_t>(checked_mul(w->row_blocks(), w->block_stride, "packed weight bytes"));
  void* p = std::aligned_alloc(64, total);
  if (!p) throw std::bad_alloc();
  // Several memory nodes: node k's share of the row blocks lives in node k's memory, where
  // node k's threads read it (parallel_for_nodes); the first writes place the pages.
  const std::vector<int> nodes = node_ids();
  if (nodes.size() > 1)
    for (size_t k = 0; k < nodes.size(); ++k) {
      const auto [b, e] = share(w->row_blocks(), static_cast<int64_t>(k), static_cast<int64_t>(nodes.size()));
      bind_to_node(static_cast<uint8_t*>(p) + b * w->block_stride, static_cast<size_t>((e - b) * w->block_stride),
                   nodes[k]);
    }
  w->data.reset(static_cast<uint8_t*>(p));
  if (!fill) return w;
  std::memset(p, 0, total);
  // Biased int8: padding must decode to q = 0, i.e. byte 128.
  if (kind == WeightKind::Int8)
    for (int64_t rb = 0; rb < w->row_blocks(); ++rb)
      for (int64_t g = 0; g < w->groups(); ++g) std::memset(w->block(rb) + w->group_off(g), 0x80, w->group_bytes);
  return w;
}

float packed_value(const PackedWeight& w, int64_t n, int64_t k) {
  if (n < 0 || n >= w.n || k < 0 || k >= w.k) throw std::out_of_range("packed_value index");
  if (w.kind == WeightKind::BF16) {
    uint16_t b;
    std::memcpy(&b, w.block(n / kRowBlock) + data_offset(w, static_cast<int>(n % kRowBlock), k), 2);
    return bf16_to_f32(b);
  }
  const int qi = get_q(w, n, k);
  const float q = static_cast<float>(w.lut ? w.lut_biased[qi] - 128 : qi);
  const float s = group_coef(w, 0, n, k);
  return w.has_min ? s * q + group_coef(w, 1, n, k) : s * q;
}

std::unique_ptr<PackedWeight> pack_gguf(const uint8_t* raw, size_t raw_bytes, int ggml_type,
                                        int64_t n, int64_t k, const std::string& float_fmt) {
  check_shape(n, k);
  const auto t = static_cast<GgmlType>(ggml_type);
  if (t == GgmlType::F32 || t == GgmlType::F16 || t == GgmlType::BF16) {
    const int64_t esize = t == GgmlType::F32 ? 4 : 2;
    const int64_t need = checked_mul(checked_mul(n, k, "weight shape (n x k)"), esize, "weight bytes");
    if (raw_bytes != static_cast<size_t>(need))
      throw std::invalid_argument("GGUF " + ggml_type_label(ggml_type) + " tensor of shape (" +
                                  std::to_string(n) + ", " + std::to_string(k) + ") needs " +
                                  std::to_string(need) + " bytes, got " + std::to_string(raw_bytes));
    std::vector<float> f(static_cast<size_t>(n * k));
    for (int64_t i = 0; i < n * k; ++i) {
      if (t == GgmlType::F32) {
        std::memcpy(&f[i], raw + 4 * i, 4);
      } else {
        uint16_t h;
        std::memcpy(&h, raw + 2 * i, 2);
        f[i] = t == GgmlType::F16 ? f16_to_f32(h) : bf16_to_f32(h);
      }
    }
    auto w = pack_float(f.data(), n, k, float_fmt);
    w->source_type = ggml_type;
    return w;
  }
  if (const IqGroupFormat* iq = iq_group_format(ggml_type)) return pack_iq(raw, raw_bytes, ggml_type, *iq, n, k);
  const TypeInfo* info = nullptr;
  for (const TypeInfo& ti : kTypes)
    if (ti.type == t) info = &ti;
  if (!info)
    throw std::invalid_argument("GGUF type " + ggml_type_label(ggml_type) +
                                " cannot be packed for the host linear kernels");
  if (k % info->block != 0)
    throw std::invalid_argument(ggml_type_label(ggml_type) + " rows need K % " +
                                std::to_string(info->block) + " == 0, got K=" + std::to_string(k));
  const int64_t need = checked_mul(n, (k / info->block) * info->bytes, "weight bytes");
  if (raw_bytes != static_cast<size_t>(need))
    throw std::invalid_argument("GGUF " + ggml_type_label(ggml_type) +
                                " tensor of shape (" + std::to_string(n) + ", " +
                                std::to_string(k) + ") needs " + std::to_string(need) +
                                " bytes, got " + std::to_string(raw_bytes));
  ScaleEnc enc = ScaleEnc::I8;
  if (!info->kquant) {
    enc = ScaleEnc::F16;  // d and m are f16 already; only the mins -8d (Q4_0), -16d (Q5_0) may not be
    if (t == GgmlType::Q4_0 || t == GgmlType::Q5_0) {
      const float offset = t == GgmlType::Q4_0 ? -8.0f : -16.0f;
      for (int64_t i = 0; i < n * (k / 32) && enc == ScaleEnc::F16; ++i) {
        uint16_t d;  // the first field of both block types
        std::memcpy(&d, raw + i * info->bytes, 2);
        if (!f16_exact(offset * f16_to_f32(d))) enc = ScaleEnc::F32;
      }
    }
  }
  auto w = make_packed(info->kind, enc, info->has_min, info->group, n, k, info->hi_bits);
  w->source_type = ggml_type;
  PackedWeight& ref = *w;
  by_row_blocks(n, [&](int64_t r) {
    if (info->kquant)
      pack_kquant_row(ref, ggml_type, raw, r);
    else
      pack_legacy_row(ref, ggml_type, raw, r);
  });
  return w;
}

std::unique_ptr<PackedWeight> pack_float(const float* src, int64_t n, int64_t k,
                                         const std::string& fmt) {
  check_shape(n, k);
  const bool int4 = fmt == "int4", per_row = fmt == "int8_row";
  if (!int4 && !per_row && fmt != "int8" && fmt != "bf16")
    throw std::invalid_argument("unknown weight format '" + fmt + "' (int8, int8_row, int4, bf16)");
  if (per_row && k >= 65536)
    throw std::invalid_argument("int8_row needs K < 65536 (int32 dot products), got K=" + std::to_string(k));
  for (int64_t i = 0; i < n * k; ++i)
    if (!std::isfinite(src[i]))
      throw std::invalid_argument("weight has a non-finite value at row " +
                                  std::to_string(i / k) + ", column " + std::to_string(i % k));
  if (fmt == "bf16") {
    auto w = make_packed(WeightKind::BF16, ScaleEnc::None, false, 32, n, k);
    PackedWeight& ref = *w;
    by_row_blocks(n, [&](int64_t r) {
      for (int64_t c = 0; c < k; ++c) {
        const uint16_t b = f32_to_bf16(src[r * k + c]);
        std::memcpy(ref.block(r / kRowBlock) + data_offset(ref, static_cast<int>(r % kRowBlock), c), &b, 2);
      }
    });
    return w;
  }
  if (per_row) {
    auto w = make_packed(WeightKind::Int8, ScaleEnc::Row, false, 32, n, k);
    PackedWeight& ref = *w;
    by_row_blocks(n, [&](int64_t r) {
      float amax = 0.f;
      for (int64_t c = 0; c < k; ++c) amax = std::max(amax, std::fabs(src[r * k + c]));
      const float s = amax / 127.f, inv = s == 0.f ? 0.f : 1.f / s;
      *super_slot(ref, 0, r, 0) = s;
      for (int64_t c = 0; c < k; ++c)
        set_q(ref, r, c, quantize(src[r * k + c], s, inv, -127, 127));
    });
    return w;
  }
  constexpr int G = 32;
  const int64_t groups = (k + G - 1) / G;
  // Per (row, group): scale and min before storage rounding.
  std::vector<float> sc(static_cast<size_t>(n * groups)), mn(sc.size());
  std::vector<char> row_fits(static_cast<size_t>(n));
  auto f16_ok = [](float v) { return v == 0.f || (std::fabs(v) >= 6.103515625e-05f && std::fabs(v) <= 65504.f); };
  by_row_blocks(n, [&](int64_t r) {
    bool fits = true;
    for (int64_t g = 0; g < groups; ++g) {
      const float* x = src + r * k + g * G;
      const int64_t len = std::min<int64_t>(G, k - g * G);
      float lo = x[0], hi = x[0], amax = 0.f;
      for (int64_t i = 0; i < len; ++i) {
        lo = std::min(lo, x[i]);
        hi = std::max(hi, x[i]);
        amax = std::max(amax, std::fabs(x[i]));
      }
      const float s = int4 ? (hi - lo) / 15.f : amax / 127.f;
      const float m = int4 ? lo : 0.f;
      sc[r * groups + g] = s;
      mn[r * groups + g] = m;
      fits = fits && f16_ok(s) && f16_ok(m);
    }
    row_fits[r] = fits;
  });
  bool fits_f16 = true;
  for (char f : row_fits) fits_f16 = fits_f16 && f;
  const ScaleEnc enc = fits_f16 ? ScaleEnc::F16 : ScaleEnc::F32;
  auto w = make_packed(int4 ? WeightKind::Int4 : WeightKind::Int8, enc, int4, G, n, k);
  PackedWeight& ref = *w;
  auto stored = [&](float v) { return enc == ScaleEnc::F16 ? f16_to_f32(f32_to_f16(v)) : v; };
  by_row_blocks(n, [&](int64_t r) {
    for (int64_t g = 0; g < groups; ++g) {
      const float s = stored(sc[r * groups + g]), m = stored(mn[r * groups + g]);
      set_direct(ref, 0, r, g, s);
      if (int4) set_direct(ref, 1, r, g, m);
      const float inv = s == 0.f ? 0.f : 1.f / s;
      for (int64_t c = g * G; c < std::min<int64_t>(k, (g + 1) * G); ++c) {
        set_q(ref, r, c, int4 ? quantize(src[r * k + c] - m, s, inv, 0, 15)
                              : quantize(src[r * k + c], s, inv, -127, 127));
      }
    }
  });
  return w;
}

}  // namespace ktjax
