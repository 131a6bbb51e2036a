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

// silu(g) = g * sigmoid(g) for 16 lanes, through z = e^-|g| <= 1, so no lane overflows:
// sigmoid(g) = 1 / (1 + z) for g >= 0, z / (1 + z) below.
inline F32x16 silu16(F32x16 g) {
  const F32x16 z = exp_nonpositive(g < 0.f ? g : -g);
  return g * ((g < 0.f ? z : z * 0.f + 1.f) / (1.f + z));
}

// g[i] = silu(g[i]) * u[i] for i < n.
inline void gated_activation(float* g, const float* u, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store16(g + i, silu16(load16(g + i)) * load16(u + i));
  if (i == n) return;
  alignas(64) float gt[16] = {}, ut[16] = {};
  std::memcpy(gt, g + i, (n - i) * 4);
  std::memcpy(ut, u + i, (n - i) * 4);
  store16(gt, silu16(load16(gt)) * load16(ut));
  std::memcpy(g + i, gt, (n - i) * 4);
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
