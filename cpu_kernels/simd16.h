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
typedef int32_t I32x16 __attribute__((vector_size(64)));

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

typedef float F32x8 __attribute__((vector_size(32)));
typedef float F32x4 __attribute__((vector_size(16)));

// Sum of the 16 lanes by halving (a lane-by-lane loop compiles to 15 dependent extracts).
inline float hsum(F32x16 v) {
  const F32x8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const F32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// sum(a[i] * b[i]) for i < n; b float32 or bf16 (uint16_t).
template <class B>
inline float dot(const float* a, const B* b, int64_t n) {
  F32x16 acc = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc += load16(a + i) * load16(b + i);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * to_f32(b[i]);
  return s;
}

// acc[0:n] += sum_j w[j] * v[j * stride : j * stride + n] over j < rows: each 16-value block
// of acc stays in a register while every row is added to it.
template <class B>
inline void weighted_sum(float* acc, const float* w, const B* v, int64_t stride, int64_t rows,
                         int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    F32x16 a = load16(acc + i);
    for (int64_t j = 0; j < rows; ++j) a += load16(v + j * stride + i) * w[j];
    store16(acc + i, a);
  }
  for (; i < n; ++i)
    for (int64_t j = 0; j < rows; ++j) acc[i] += to_f32(v[j * stride + i]) * w[j];
}

// e^x for x <= 0 (softmax weights), 16 lanes: 2^n * e^r with |r| <= ln2 / 2 and a degree-6
// Taylor polynomial (relative error < 2e-7); below -87 (and -inf) the result is 0.
inline F32x16 exp_nonpositive(F32x16 x) {
  const I32x16 underflow = x < -87.f;
  x = underflow ? x * 0.f - 87.f : x;  // keeps the int conversion below in range (-inf too)
  const F32x16 t = x * 1.44269504f;                          // x / ln 2
  const I32x16 n = __builtin_convertvector(t - 0.5f, I32x16);  // round(t) for t <= 0
  const F32x16 nf = __builtin_convertvector(n, F32x16);
  const F32x16 r = x - nf * 0.693145752f - nf * 1.42860677e-6f;  // ln 2 split hi + lo
  F32x16 p = r * (1.f / 720) + (1.f / 120);
  p = p * r + (1.f / 24);
  p = p * r + (1.f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  I32x16 bits;
  std::memcpy(&bits, &p, sizeof bits);
  bits += n << 23;
  bits = underflow ? bits * 0 : bits;
  F32x16 out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

}  // namespace simd16
}  // namespace
}  // namespace ktjax
