// Scalar reference of activation_body.h (the MoE's gated activation and weighted sum): the
// same formulas one value at a time, with simd16.h's e^x polynomial written out, so it gives
// the generic build's results (no FMA at that level) and the SIMD levels differ from it only
// by their FMA contractions. moe_forward(reference=true) runs it.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_kernels/moe/expert_epilogue.h"

namespace ktjax {
namespace activation_reference {

// simd16::exp_nonpositive for one value (x <= 0; below -87 and -inf: 0; NaN stays NaN).
inline float exp_nonpositive(float x) {
  if (x != x) return x;
  if (x < -87.f) return 0.f;
  const float t = x * 1.44269504f;
  const int32_t n = static_cast<int32_t>(t - 0.5f);  // round(t) for t <= 0
  const float nf = static_cast<float>(n);
  const float r = x - nf * 0.693145752f - nf * 1.42860677e-6f;
  float p = r * (1.f / 720) + (1.f / 120);
  p = p * r + (1.f / 24);
  p = p * r + (1.f / 6);
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(static_cast<uint32_t>(n) << 23);
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float times_sigmoid(float x, float s) {
  const float z = exp_nonpositive(s < 0.f ? s : -s);
  return x * ((s < 0.f ? z : 1.f) / (1.f + z));
}

inline float gated(const GatedActivation& a, float g, float u) {
  if (a.kind != ExpertActivation::kSwigluOai) return times_sigmoid(g, g) * u;
  g = g > a.limit ? a.limit : g;
  u = u > a.limit ? a.limit : (u < -a.limit ? -a.limit : u);
  return times_sigmoid(g, g * a.alpha) * (u + 1.f);
}

// g[0:n] = a(g + gb, u + ub); gb / ub nullptr: no bias.
inline void gated_activation(const GatedActivation& a, float* g, const float* u, const float* gb,
                             const float* ub, int64_t n) {
  for (int64_t i = 0; i < n; ++i) g[i] = gated(a, gb ? g[i] + gb[i] : g[i], ub ? u[i] + ub[i] : u[i]);
}

// acc[0:n] += w * (y + b); b nullptr: no bias.
inline void add_scaled(float* acc, float w, const float* y, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += w * (b ? y[i] + b[i] : y[i]);
}

}  // namespace activation_reference
}  // namespace ktjax
