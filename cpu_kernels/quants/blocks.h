// GGUF quant block layouts (ggml-common.h). Packed: blocks sit back to back at any byte
// offset, so members may be unaligned and must be read through these structs or memcpy.
#pragma once

#include <cstdint>

namespace ktjax {

constexpr int QK4_0 = 32, QK4_1 = 32, QK5_0 = 32, QK5_1 = 32, QK8_0 = 32;
constexpr int QK_K = 256;
constexpr int K_SCALE_SIZE = 12;

using half_bits = uint16_t;  // IEEE binary16, stored little-endian

struct __attribute__((packed)) BlockQ4_0 { half_bits d; uint8_t qs[QK4_0 / 2]; };
struct __attribute__((packed)) BlockQ4_1 { half_bits d, m; uint8_t qs[QK4_1 / 2]; };
struct __attribute__((packed)) BlockQ5_0 { half_bits d; uint8_t qh[4]; uint8_t qs[QK5_0 / 2]; };
struct __attribute__((packed)) BlockQ5_1 {
  half_bits d, m; uint8_t qh[4]; uint8_t qs[QK5_1 / 2];
};
struct __attribute__((packed)) BlockQ8_0 { half_bits d; int8_t qs[QK8_0]; };

struct __attribute__((packed)) BlockQ2_K {
  uint8_t scales[QK_K / 16];  // low nibble: scale, high nibble: min
  uint8_t qs[QK_K / 4];
  half_bits d, dmin;
};
struct __attribute__((packed)) BlockQ3_K {
  uint8_t hmask[QK_K / 8];
  uint8_t qs[QK_K / 4];
  uint8_t scales[12];  // 16 six-bit scales
  half_bits d;
};
struct __attribute__((packed)) BlockQ4_K {
  half_bits d, dmin;
  uint8_t scales[K_SCALE_SIZE];  // 8 six-bit scales and 8 six-bit mins
  uint8_t qs[QK_K / 2];
};
struct __attribute__((packed)) BlockQ5_K {
  half_bits d, dmin;
  uint8_t scales[K_SCALE_SIZE];
  uint8_t qh[QK_K / 8];
  uint8_t qs[QK_K / 2];
};
struct __attribute__((packed)) BlockQ6_K {
  uint8_t ql[QK_K / 2];
  uint8_t qh[QK_K / 4];
  int8_t scales[QK_K / 16];
  half_bits d;
};

static_assert(sizeof(BlockQ4_0) == 18, "Q4_0 block size");
static_assert(sizeof(BlockQ4_1) == 20, "Q4_1 block size");
static_assert(sizeof(BlockQ5_0) == 22, "Q5_0 block size");
static_assert(sizeof(BlockQ5_1) == 24, "Q5_1 block size");
static_assert(sizeof(BlockQ8_0) == 34, "Q8_0 block size");
static_assert(sizeof(BlockQ2_K) == 84, "Q2_K block size");
static_assert(sizeof(BlockQ3_K) == 110, "Q3_K block size");
static_assert(sizeof(BlockQ4_K) == 144, "Q4_K block size");
static_assert(sizeof(BlockQ5_K) == 176, "Q5_K block size");
static_assert(sizeof(BlockQ6_K) == 210, "Q6_K block size");

// IQ types (i-quants): values come from lookup grids (iq_tables.h).
struct __attribute__((packed)) BlockIQ2_XXS { half_bits d; uint16_t qs[QK_K / 8]; };
struct __attribute__((packed)) BlockIQ2_XS {
  half_bits d; uint16_t qs[QK_K / 8]; uint8_t scales[QK_K / 32];
};
struct __attribute__((packed)) BlockIQ2_S {
  half_bits d; uint8_t qs[QK_K / 8]; uint8_t signs[QK_K / 8]; uint8_t qh[QK_K / 32];
  uint8_t scales[QK_K / 32];
};
struct __attribute__((packed)) BlockIQ3_XXS {
  half_bits d; uint8_t qs[QK_K / 4]; uint8_t scales_signs[QK_K / 8];  // 8 uint32 after qs
};
struct __attribute__((packed)) BlockIQ3_S {
  half_bits d; uint8_t qs[QK_K / 4]; uint8_t qh[QK_K / 32]; uint8_t signs[QK_K / 8];
  uint8_t scales[QK_K / 64];
};
struct __attribute__((packed)) BlockIQ1_S { half_bits d; uint8_t qs[QK_K / 8]; uint16_t qh[QK_K / 32]; };
struct __attribute__((packed)) BlockIQ1_M {
  uint8_t qs[QK_K / 8]; uint8_t qh[QK_K / 16];
  uint16_t scales[4];  // 16 three-bit scales; the top nibbles hold the f16 d
};
constexpr int QK4_NL = 32, QK_MXFP4 = 32;
struct __attribute__((packed)) BlockIQ4_NL { half_bits d; uint8_t qs[QK4_NL / 2]; };
struct __attribute__((packed)) BlockIQ4_XS {
  half_bits d; uint16_t scales_h; uint8_t scales_l[QK_K / 64]; uint8_t qs[QK_K / 2];
};
// Ternary types: values in {-1, 0, 1} times d.
struct __attribute__((packed)) BlockTQ1_0 {
  uint8_t qs[(QK_K - 4 * QK_K / 64) / 5];  // 5 trits per byte
  uint8_t qh[QK_K / 64];                   // 4 trits per byte
  half_bits d;
};
struct __attribute__((packed)) BlockTQ2_0 { uint8_t qs[QK_K / 4]; half_bits d; };
// MXFP4: e2m1 values with a shared e8m0 exponent.
struct __attribute__((packed)) BlockMXFP4 { uint8_t e; uint8_t qs[QK_MXFP4 / 2]; };

static_assert(sizeof(BlockIQ2_XXS) == 66, "IQ2_XXS block size");
static_assert(sizeof(BlockIQ2_XS) == 74, "IQ2_XS block size");
static_assert(sizeof(BlockIQ2_S) == 82, "IQ2_S block size");
static_assert(sizeof(BlockIQ3_XXS) == 98, "IQ3_XXS block size");
static_assert(sizeof(BlockIQ3_S) == 110, "IQ3_S block size");
static_assert(sizeof(BlockIQ1_S) == 50, "IQ1_S block size");
static_assert(sizeof(BlockIQ1_M) == 56, "IQ1_M block size");

// IQ1_M has no d field: its f16 bits are the top nibbles of the four 16-bit scale words
// (`sc`, copied out of `scales`), lowest word first.
inline uint16_t iq1_m_d_bits(const uint16_t sc[4]) {
  return static_cast<uint16_t>((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) |
                               (sc[3] & 0xf000));
}
static_assert(sizeof(BlockIQ4_NL) == 18, "IQ4_NL block size");
static_assert(sizeof(BlockIQ4_XS) == 136, "IQ4_XS block size");
static_assert(sizeof(BlockTQ1_0) == 54, "TQ1_0 block size");
static_assert(sizeof(BlockTQ2_0) == 66, "TQ2_0 block size");
static_assert(sizeof(BlockMXFP4) == 17, "MXFP4 block size");

}  // namespace ktjax
