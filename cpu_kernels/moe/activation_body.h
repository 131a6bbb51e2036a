// The MoE's element-wise bodies over simd16.h's helpers, compiled per ISA (see simd16.h):
// the gated activation between gate/up and down, and the routing-weighted sum of expert
// outputs. Scalar tails use the same formulas lane by lane, so every ISA agrees closely.
#pragma once

#include <cstdint>

#include "cpu_kernels/simd16.h"

namespace ktjax {
namespace {
namespace activation_body {

using namespace simd16;

// act(g) for 16 lanes: SiLU g * sigmoid(g) or GELU (tanh form). Both go through
// z = e^-|y| <= 1, so no lane overflows: sigmoid(y) = 1 / (1 + z) for y >= 0, z / (1 + z)
// below; tanh(y) = sign(y) (1 - z) / (1 + z) with z = e^(-2|y|).
template <bool kGelu>
inline F32x16 act16(F32x16 g) {
  if (kGelu) {
    const F32x16 y = 0.7978845608f * (g + 0.044715f * g * g * g);  // sqrt(2 / pi) (...)
    const F32x16 ay = y < 0.f ? -y : y;
    const F32x16 z = exp_nonpositive(-2.f * ay);
    const F32x16 t = (1.f - z) / (1.f + z);
    return 0.5f * g * (1.f + (y < 0.f ? -t : t));
  }
  const F32x16 z = exp_nonpositive(g < 0.f ? g : -g);
  return g * ((g < 0.f ? z : z * 0.f + 1.f) / (1.f + z));
}

// g[i] = act(g[i]) * u[i] for i < n.
template <bool kGelu>
inline void gated(float* g, const float* u, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(g + i, act16<kGelu>(load16(g + i)) * load16(u + i));
  if (i == n) return;
  alignas(64) float gt[16] = {}, ut[16] = {};
  std::memcpy(gt, g + i, (n - i) * 4);
  std::memcpy(ut, u + i, (n - i) * 4);
  store16(gt, act16<kGelu>(load16(gt)) * load16(ut));
  std::memcpy(g + i, gt, (n - i) * 4);
}

inline void gated_activation(bool gelu, float* g, const float* u, int64_t n) {
  gelu ? gated<true>(g, u, n) : gated<false>(g, u, n);
}

// acc[i] += w * y[i] for i < n.
inline void add_scaled(float* acc, float w, const float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(acc + i, load16(acc + i) + w * load16(y + i));
  for (; i < n; ++i) acc[i] += w * y[i];
}

}  // namespace activation_body
}  // namespace
}  // namespace ktjax
