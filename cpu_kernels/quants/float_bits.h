// Scalar float16 / bfloat16 <-> float32 conversions, branch-free so that loops over them
// vectorise, and bit-exact with numpy (f16 -> f32 keeps NaN payloads unquieted) and
// ml_dtypes (f32 -> bf16 rounds to nearest even; NaN becomes a quiet NaN with its sign).
#pragma once

#include <cstdint>
#include <cstring>

namespace ktjax {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float f16_to_f32(uint16_t h) {
  const uint32_t o = uint32_t(h & 0x7fffu) << 13;  // exponent and mantissa in place
  const uint32_t exp = o & 0x0f800000u;
  const uint32_t normal = o + 0x38000000u;  // rebias exponent 15 -> 127
  const uint32_t infnan = o + 0x70000000u;  // exponent 31 -> 255, payload kept
  // Subnormal: (1.m * 2^-14) - 2^-14 = m * 2^-24, computed exactly on normal floats, so
  // flush-to-zero / denormals-are-zero modes cannot change it.
  const uint32_t sub = f32_bits(bits_f32(o + 0x38800000u) - 6.103515625e-05f);
  const uint32_t mag = exp == 0x0f800000u ? infnan : (exp == 0 ? sub : normal);
  return bits_f32((uint32_t(h & 0x8000u) << 16) | mag);
}

// MXFP4's e8m0 exponent byte as the scale of its doubled e2m1 values (ggml_e8m0_to_fp32_half):
// 2^(e - 128), exact for every e (2^-128 and 2^-127 are subnormal).
inline float e8m0_half_to_f32(uint8_t e) {
  return bits_f32(e < 2 ? uint32_t{0x00200000} << e : uint32_t(e - 1) << 23);
}

inline float bf16_to_f32(uint16_t b) { return bits_f32(uint32_t(b) << 16); }

inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t qnan = ((u >> 16) & 0x8000u) | 0x7fc0u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? qnan : rounded);
}

}  // namespace ktjax
