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

}  // namespace ktjax
