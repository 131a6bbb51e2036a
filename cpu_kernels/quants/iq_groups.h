// IQ / ternary / MXFP4 blocks as groups of 32 (or 16) small integers with one float scale: the form
// the host kernels hold (cpu_kernels/formats/pack.cpp). For every type listed, scale * q
// (float32) equals the dequantized value bit for bit (dequant.cpp), so repacking through this
// is lossless: grids are small integers, IQ1's +-1/8 delta becomes q = 8 * grid +- 1 with
// scale / 8. Every type takes at most 16 distinct values (iq_group_table), so the kernels
// hold 4-bit indices into that table (iq_group_indices) and look them up in registers.
// IQ2_XS, IQ2_S and IQ1_M keep a scale per 16 values: groups of 16.
// Where a scale is a small integer times a per-block float (all but IQ4_NL and MXFP4),
// iq_group_int_scale splits it so: the K-quant scale encoding, exact and 4x smaller than f32.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_kernels/quants/blocks.h"
#include "cpu_kernels/quants/float_bits.h"
#include "cpu_kernels/quants/ggml_types.h"
#include "cpu_kernels/quants/iq_tables.h"

namespace ktjax {

struct IqGroupFormat {
  int block;  // values per GGUF block
  int bytes;  // bytes per GGUF block
  bool f16_scale;  // every scale is an f16 value (else f32 is needed)
  int group = 32;  // values per scale
};

// The format of a type that decodes into groups of small integers, or nullptr.
inline const IqGroupFormat* iq_group_format(int type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::IQ4_NL: { static const IqGroupFormat f{QK4_NL, sizeof(BlockIQ4_NL), true}; return &f; }
    case GgmlType::MXFP4: { static const IqGroupFormat f{QK_MXFP4, sizeof(BlockMXFP4), false}; return &f; }
    case GgmlType::IQ4_XS: { static const IqGroupFormat f{QK_K, sizeof(BlockIQ4_XS), false}; return &f; }
    case GgmlType::IQ2_XXS: { static const IqGroupFormat f{QK_K, sizeof(BlockIQ2_XXS), false}; return &f; }
    case GgmlType::IQ3_XXS: { static const IqGroupFormat f{QK_K, sizeof(BlockIQ3_XXS), false}; return &f; }
    case GgmlType::IQ3_S: { static const IqGroupFormat f{QK_K, sizeof(BlockIQ3_S), false}; return &f; }
    case GgmlType::IQ1_S: { static const IqGroupFormat f{QK_K, sizeof(BlockIQ1_S), false}; return &f; }
    case GgmlType::TQ1_0: { static const IqGroupFormat f{QK_K, sizeof(BlockTQ1_0), true}; return &f; }
    case GgmlType::TQ2_0: { static const IqGroupFormat f{QK_K, sizeof(BlockTQ2_0), true}; return &f; }
    case GgmlType::IQ2_XS: { static const IqGroupFormat f{QK_K, sizeof(BlockIQ2_XS), false, 16}; return &f; }
    case GgmlType::IQ2_S: { static const IqGroupFormat f{QK_K, sizeof(BlockIQ2_S), false, 16}; return &f; }
    case GgmlType::IQ1_M: { static const IqGroupFormat f{QK_K, sizeof(BlockIQ1_M), false, 16}; return &f; }
    default: break;
  }
  return nullptr;
}

// Tables of the types whose values are not already 16 nibble levels, ascending (the unused
// tail entries are 0): grid values times a sign, IQ1's 8 * {-1, 0, 1} +- 1.
inline constexpr int8_t kIq2Levels[16] = {-43, -25, -8, 8, 25, 43};  // IQ2_XXS / XS / S
inline constexpr int8_t kIq3xxsLevels[16] = {-62, -52, -44, -36, -28, -20, -12, -4, 4, 12, 20, 28, 36, 44, 52, 62};
inline constexpr int8_t kIq3sLevels[16] = {-15, -13, -11, -9, -7, -5, -3, -1, 1, 3, 5, 7, 9, 11, 13, 15};
inline constexpr int8_t kIq1Levels[16] = {-9, -7, -1, 1, 7, 9};  // IQ1_S / IQ1_M
// TQ1_0 / TQ2_0: ternary, but TQ2_0's 2-bit codes also decode 3 to 2.
inline constexpr int8_t kTernaryLevels[16] = {-1, 0, 1, 2};

// The 16-entry value table of a type iq_group_format accepts (values = scale * table[index]),
// else nullptr.
inline const int8_t* iq_group_table(int type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::IQ4_NL:
    case GgmlType::IQ4_XS: return kIq4nlValues;
    case GgmlType::MXFP4: return kMxfp4Values;
    case GgmlType::IQ2_XXS:
    case GgmlType::IQ2_XS:
    case GgmlType::IQ2_S: return kIq2Levels;
    case GgmlType::IQ3_XXS: return kIq3xxsLevels;
    case GgmlType::IQ3_S: return kIq3sLevels;
    case GgmlType::IQ1_S:
    case GgmlType::IQ1_M: return kIq1Levels;
    case GgmlType::TQ1_0:
    case GgmlType::TQ2_0: return kTernaryLevels;
    default: return nullptr;
  }
}

namespace iq_detail {
inline int ksign(uint8_t signs, int j) { return (signs >> j) & 1 ? -1 : 1; }
inline uint32_t u32_at(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline uint16_t u16_at(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline void nibbles(const uint8_t* qs, const int8_t* table, int8_t* q) {
  for (int j = 0; j < 16; ++j) {
    q[j] = table[qs[j] & 15];
    q[j + 16] = table[qs[j] >> 4];
  }
}
inline int8_t trit(uint8_t byte, int p) {
  static constexpr uint8_t kPow3[5] = {1, 3, 9, 27, 81};
  const uint8_t x = static_cast<uint8_t>(byte * kPow3[p]);
  return static_cast<int8_t>(((x * 3) >> 8) - 1);
}
}  // namespace iq_detail

// Group g (0 .. block/group - 1) of one block of a type iq_group_format accepts: its values
// as q[0 .. group - 1] and the scale they share.
inline void iq_group_decode(int type, const uint8_t* blk, int g, int8_t* q, float* scale) {
  using namespace iq_detail;
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::IQ4_NL: {
      const auto& b = *reinterpret_cast<const BlockIQ4_NL*>(blk);
      *scale = f16_to_f32(b.d);
      nibbles(b.qs, kIq4nlValues, q);
      return;
    }
    case GgmlType::MXFP4: {
      const auto& b = *reinterpret_cast<const BlockMXFP4*>(blk);
      *scale = e8m0_half_to_f32(b.e);
      nibbles(b.qs, kMxfp4Values, q);
      return;
    }
    case GgmlType::IQ4_XS: {
      const auto& b = *reinterpret_cast<const BlockIQ4_XS*>(blk);
      const uint16_t sh = b.scales_h;
      const int ls = ((b.scales_l[g / 2] >> (4 * (g % 2))) & 15) | (((sh >> (2 * g)) & 3) << 4);
      *scale = f16_to_f32(b.d) * static_cast<float>(ls - 32);
      nibbles(b.qs + 16 * g, kIq4nlValues, q);
      return;
    }
    case GgmlType::IQ2_XXS: {
      const auto& b = *reinterpret_cast<const BlockIQ2_XXS*>(blk);
      const auto* qs = reinterpret_cast<const uint8_t*>(b.qs) + 8 * g;
      const uint32_t aux1 = u32_at(qs + 4);
      *scale = f16_to_f32(b.d) * (0.5f + static_cast<float>(aux1 >> 28)) * 0.25f;
      for (int l = 0; l < 4; ++l) {
        const uint8_t signs = kKsigns[(aux1 >> (7 * l)) & 127];
        for (int j = 0; j < 8; ++j) q[8 * l + j] = static_cast<int8_t>(kIq2xxsGrid[qs[l]][j] * ksign(signs, j));
      }
      return;
    }
    case GgmlType::IQ3_XXS: {
      const auto& b = *reinterpret_cast<const BlockIQ3_XXS*>(blk);
      const uint32_t aux = u32_at(b.scales_signs + 4 * g);
      *scale = f16_to_f32(b.d) * (0.5f + static_cast<float>(aux >> 28)) * 0.5f;
      for (int l = 0; l < 4; ++l) {
        const uint8_t signs = kKsigns[(aux >> (7 * l)) & 127];
        for (int m = 0; m < 2; ++m)
          for (int t = 0; t < 4; ++t)
            q[8 * l + 4 * m + t] = static_cast<int8_t>(kIq3xxsGrid[b.qs[8 * g + 2 * l + m]][t] * ksign(signs, 4 * m + t));
      }
      return;
    }
    case GgmlType::IQ3_S: {
      const auto& b = *reinterpret_cast<const BlockIQ3_S*>(blk);
      const int ls = (b.scales[g / 2] >> (4 * (g % 2))) & 15;
      *scale = f16_to_f32(b.d) * static_cast<float>(1 + 2 * ls);
      for (int i = 8 * g; i < 8 * g + 8; ++i) {
        const int idx = b.qs[i] | (((b.qh[i / 8] >> (i % 8)) & 1) << 8);
        for (int t = 0; t < 4; ++t) {
          const int e = 4 * i + t;
          q[e - 32 * g] = static_cast<int8_t>(kIq3sGrid[idx][t] * ksign(b.signs[e / 8], e % 8));
        }
      }
      return;
    }
    case GgmlType::IQ1_S: {
      const auto& b = *reinterpret_cast<const BlockIQ1_S*>(blk);
      const uint16_t h = u16_at(reinterpret_cast<const uint8_t*>(b.qh) + 2 * g);
      // dl * (grid + delta) = (dl / 8) * (8 * grid + 8 * delta), exact: dl / 8 stays normal.
      *scale = f16_to_f32(b.d) * static_cast<float>(2 * ((h >> 12) & 7) + 1) * 0.125f;
      const int delta8 = (h & 0x8000) ? -1 : 1;
      for (int l = 0; l < 4; ++l) {
        const int8_t* grid = kIq1sGrid[b.qs[4 * g + l] | (((h >> (3 * l)) & 7) << 8)];
        for (int j = 0; j < 8; ++j) q[8 * l + j] = static_cast<int8_t>(8 * grid[j] + delta8);
      }
      return;
    }
    case GgmlType::TQ1_0: {
      const auto& b = *reinterpret_cast<const BlockTQ1_0*>(blk);
      *scale = f16_to_f32(b.d);
      for (int i = 0; i < 32; ++i) {  // value e = 32g + i, in dequant.cpp's trit order
        const int e = 32 * g + i;
        q[i] = e < 160 ? trit(b.qs[e % 32], e / 32)
             : e < 240 ? trit(b.qs[32 + (e - 160) % 16], (e - 160) / 16)
                       : trit(b.qh[(e - 240) % 4], (e - 240) / 4);
      }
      return;
    }
    case GgmlType::IQ2_XS: {  // groups of 16: two 8-value units of 9-bit grid index + 7 signs
      const auto& b = *reinterpret_cast<const BlockIQ2_XS*>(blk);
      const int ls = (b.scales[g / 2] >> (4 * (g % 2))) & 15;
      *scale = f16_to_f32(b.d) * (0.5f + static_cast<float>(ls)) * 0.25f;
      for (int u = 0; u < 2; ++u) {
        const uint16_t v = u16_at(reinterpret_cast<const uint8_t*>(b.qs) + 2 * (2 * g + u));
        const uint8_t signs = kKsigns[v >> 9];
        for (int j = 0; j < 8; ++j) q[8 * u + j] = static_cast<int8_t>(kIq2xsGrid[v & 511][j] * ksign(signs, j));
      }
      return;
    }
    case GgmlType::IQ2_S: {
      const auto& b = *reinterpret_cast<const BlockIQ2_S*>(blk);
      const int ls = (b.scales[g / 2] >> (4 * (g % 2))) & 15;
      *scale = f16_to_f32(b.d) * (0.5f + static_cast<float>(ls)) * 0.25f;
      for (int u = 0; u < 2; ++u) {
        const int i = 2 * g + u;
        const int idx = b.qs[i] | (((b.qh[i / 4] >> (2 * (i % 4))) & 3) << 8);
        for (int j = 0; j < 8; ++j) q[8 * u + j] = static_cast<int8_t>(kIq2sGrid[idx][j] * ksign(b.signs[i], j));
      }
      return;
    }
    case GgmlType::IQ1_M: {
      const auto& b = *reinterpret_cast<const BlockIQ1_M*>(blk);
      uint16_t sc[4];
      std::memcpy(sc, b.scales, 8);
      const uint16_t d_bits = iq1_m_d_bits(sc);
      // As IQ1_S: (dl / 8) * (8 * grid +- 1), the delta sign per 8 values.
      *scale = f16_to_f32(d_bits) * static_cast<float>(2 * ((sc[g / 4] >> (3 * (g % 4))) & 7) + 1) * 0.125f;
      for (int u = 0; u < 2; ++u) {
        const int i = 2 * g + u;
        const int h = b.qh[i / 2] >> (4 * (i % 2));
        const int8_t* grid = kIq1sGrid[b.qs[i] | ((h & 7) << 8)];
        for (int j = 0; j < 8; ++j) q[8 * u + j] = static_cast<int8_t>(8 * grid[j] + ((h & 8) ? -1 : 1));
      }
      return;
    }
    case GgmlType::TQ2_0: {
      const auto& b = *reinterpret_cast<const BlockTQ2_0*>(blk);
      *scale = f16_to_f32(b.d);
      const int h = g / 4, s = g % 4;
      for (int l = 0; l < 32; ++l) q[l] = static_cast<int8_t>(((b.qs[32 * h + l] >> (2 * s)) & 3) - 1);
      return;
    }
    default:
      break;
  }
}

// Group g's table indices (iq_group_decode's values are table[idx]) and its scale.
inline void iq_group_indices(int type, const uint8_t* blk, int g, uint8_t* idx, float* scale) {
  int8_t values[32];
  iq_group_decode(type, blk, g, values, scale);
  const int group = iq_group_format(type)->group;
  const uint8_t* qs = nullptr;
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::IQ4_NL: qs = reinterpret_cast<const BlockIQ4_NL*>(blk)->qs; break;
    case GgmlType::MXFP4: qs = reinterpret_cast<const BlockMXFP4*>(blk)->qs; break;
    case GgmlType::IQ4_XS: qs = reinterpret_cast<const BlockIQ4_XS*>(blk)->qs + 16 * g; break;
    default: {  // a value's index in the ascending table: the levels below it
      const int8_t* table = iq_group_table(type);
      for (int j = 0; j < group; ++j) {
        int i = 0;
        while (i < 15 && table[i] != values[j]) ++i;
        idx[j] = static_cast<uint8_t>(i);
      }
      return;
    }
  }
  for (int j = 0; j < 16; ++j) {  // the nibbles as stored (MXFP4's -0 keeps its own index)
    idx[j] = qs[j] & 15;         // low nibbles are values 0..15, high nibbles 16..31
    idx[j + 16] = qs[j] >> 4;
  }
}

// Group g's scale as mult * factor, exactly (an integer below 64 in magnitude times the
// block's float), for the types whose scales are so made; false for IQ4_NL and MXFP4.
inline bool iq_group_int_scale(int type, const uint8_t* blk, int g, int* mult, float* factor) {
  using namespace iq_detail;
  const float d = f16_to_f32(u16_at(blk));  // d leads the block, except in TQ and IQ1_M
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::IQ4_XS: {
      const auto& b = *reinterpret_cast<const BlockIQ4_XS*>(blk);
      *mult = (((b.scales_l[g / 2] >> (4 * (g % 2))) & 15) | (((b.scales_h >> (2 * g)) & 3) << 4)) - 32;
      *factor = d;
      return true;
    }
    case GgmlType::IQ2_XXS:  // d * (0.5 + l) * 0.25 = (2l + 1) * (d / 8)
      *mult = 2 * static_cast<int>(u32_at(reinterpret_cast<const uint8_t*>(reinterpret_cast<const BlockIQ2_XXS*>(blk)->qs) + 8 * g + 4) >> 28) + 1;
      *factor = d * 0.125f;
      return true;
    case GgmlType::IQ3_XXS:  // d * (0.5 + l) * 0.5 = (2l + 1) * (d / 4)
      *mult = 2 * static_cast<int>(u32_at(reinterpret_cast<const BlockIQ3_XXS*>(blk)->scales_signs + 4 * g) >> 28) + 1;
      *factor = d * 0.25f;
      return true;
    case GgmlType::IQ3_S:
      *mult = 1 + 2 * ((reinterpret_cast<const BlockIQ3_S*>(blk)->scales[g / 2] >> (4 * (g % 2))) & 15);
      *factor = d;
      return true;
    case GgmlType::IQ1_S:  // (d * (2s + 1)) / 8
      *mult = 2 * ((u16_at(reinterpret_cast<const uint8_t*>(reinterpret_cast<const BlockIQ1_S*>(blk)->qh) + 2 * g) >> 12) & 7) + 1;
      *factor = d * 0.125f;
      return true;
    case GgmlType::IQ2_XS:
      *mult = 2 * ((reinterpret_cast<const BlockIQ2_XS*>(blk)->scales[g / 2] >> (4 * (g % 2))) & 15) + 1;
      *factor = d * 0.125f;
      return true;
    case GgmlType::IQ2_S:
      *mult = 2 * ((reinterpret_cast<const BlockIQ2_S*>(blk)->scales[g / 2] >> (4 * (g % 2))) & 15) + 1;
      *factor = d * 0.125f;
      return true;
    case GgmlType::IQ1_M: {
      const auto& b = *reinterpret_cast<const BlockIQ1_M*>(blk);
      uint16_t sc[4];
      std::memcpy(sc, b.scales, 8);
      const uint16_t d_bits = iq1_m_d_bits(sc);
      *mult = 2 * ((sc[g / 4] >> (3 * (g % 4))) & 7) + 1;
      *factor = f16_to_f32(d_bits) * 0.125f;
      return true;
    }
    case GgmlType::TQ1_0:
      *mult = 1;
      *factor = f16_to_f32(reinterpret_cast<const BlockTQ1_0*>(blk)->d);
      return true;
    case GgmlType::TQ2_0:
      *mult = 1;
      *factor = f16_to_f32(reinterpret_cast<const BlockTQ2_0*>(blk)->d);
      return true;
    default: return false;
  }
}

}  // namespace ktjax
