// Float kernels' vector helpers over GCC/Clang vector extensions (16 float lanes): each ISA
// translation unit that includes this compiles them with its own flags, so one source
// becomes SSE2, AVX2 or AVX-512 code. Everything sits in an anonymous namespace: internal
// linkage keeps the linker from handing one unit's ISA variant to another.
#pragma once

#include <cstdint>
#include <cstring>

namespace ktjax {
namespace {
namespace simd16 {

typedef float F32x16 __attribute__((vector_size(64)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint16_t U16x16 __attribute__((vector_size(32)));

inline F32x16 load16(const float* p) {
  F32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline F32x16 load16(const uint16_t* p) {  // bf16 -> f32: the high half of the f32 bits
  U16x16 h;
  std::memcpy(&h, p, sizeof h);
  const U32x16 w = __builtin_convertvector(h, U32x16) << 16;
  F32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
inline float to_f32(float v) { return v; }
inline float to_f32(uint16_t v) {
  const uint32_t w = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
inline void store16(float* p, F32x16 v) { std::memcpy(p, &v, sizeof v); }

// sum(a[i] * b[i]) for i < n; b float32 or bf16 (uint16_t).
template <class B>
inline float dot(const float* a, const B* b, int64_t n) {
  F32x16 acc = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
  float s = 0.f;
  for (int l = 0; l < 16; ++l) s += acc[l];
  for (; i < n; ++i) s += a[i] * to_f32(b[i]);
  return s;
}

// acc = acc * keep + w * v over n values.
template <class B>
inline void scale_add(float* acc, float keep, float w, const B* v, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(acc + i, load16(acc + i) * keep + load16(v + i) * w);
  for (; i < n; ++i) acc[i] = acc[i] * keep + to_f32(v[i]) * w;
}

}  // namespace simd16
}  // namespace
}  // namespace ktjax
