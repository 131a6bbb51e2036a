// The MoE's element-wise bodies over simd16.h's helpers, compiled per ISA (see simd16.h):
// the gated activation between gate/up and down (SiLU, or gpt-oss's clamped SwiGLU, with
// optional per-expert biases), and the routing-weighted sum of expert outputs. Scalar tails
// use the same formulas lane by lane, so every ISA agrees closely.
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_kernels/moe/expert_epilogue.h"
#include "cpu_kernels/simd16.h"

namespace ktjax {
namespace {
namespace activation_body {

using namespace simd16;

// x * sigmoid(s) for 16 lanes, through z = e^-|s| <= 1, so no lane overflows:
// sigmoid(s) = 1 / (1 + z) for s >= 0, z / (1 + z) below.
inline F32x16 times_sigmoid(F32x16 x, F32x16 s) {
  const F32x16 z = exp_nonpositive(s < 0.f ? s : -s);
  return x * ((s < 0.f ? z : z * 0.f + 1.f) / (1.f + z));
}

inline F32x16 silu_gated(F32x16 g, F32x16 u) { return times_sigmoid(g, g) * u; }

// gpt-oss's SwiGLU: the comparisons keep a NaN lane NaN (it fails both), as jnp.minimum /
// jnp.clip do, so the kernel's NaN check still sees it.
inline F32x16 swiglu_oai_gated(F32x16 g, F32x16 u, float alpha, float limit) {
  const F32x16 hi = F32x16{} + limit, lo = F32x16{} - limit;
  g = g > hi ? hi : g;
  u = u > hi ? hi : (u < lo ? lo : u);
  return times_sigmoid(g, g * alpha) * (u + 1.f);
}

// g[i] = act(g[i] + gb[i], u[i] + ub[i]) for i < n; gb / ub may be nullptr (no bias).
template <class Act>
inline void gated_rows(float* g, const float* u, const float* gb, const float* ub, int64_t n, Act act) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    F32x16 gv = load16(g + i), uv = load16(u + i);
    if (gb) gv += load16(gb + i);
    if (ub) uv += load16(ub + i);
    store16(g + i, act(gv, uv));
  }
  if (i == n) return;
  alignas(64) float gt[16] = {}, ut[16] = {}, gbt[16] = {}, ubt[16] = {};
  const size_t rest = static_cast<size_t>(n - i) * 4;
  std::memcpy(gt, g + i, rest);
  std::memcpy(ut, u + i, rest);
  if (gb) std::memcpy(gbt, gb + i, rest);
  if (ub) std::memcpy(ubt, ub + i, rest);
  F32x16 gv = load16(gt), uv = load16(ut);
  if (gb) gv += load16(gbt);
  if (ub) uv += load16(ubt);
  store16(gt, act(gv, uv));
  std::memcpy(g + i, gt, rest);
}

// g[0:n] = a(g + gb, u + ub): the MoE's gated activation (see ExpertActivation).
inline void gated_activation(const GatedActivation& a, float* g, const float* u, const float* gb,
                             const float* ub, int64_t n) {
  if (a.kind == ExpertActivation::kSwigluOai) {
    const float alpha = a.alpha, limit = a.limit;
    gated_rows(g, u, gb, ub, n, [=](F32x16 gv, F32x16 uv) { return swiglu_oai_gated(gv, uv, alpha, limit); });
  } else {
    gated_rows(g, u, gb, ub, n, [](F32x16 gv, F32x16 uv) { return silu_gated(gv, uv); });
  }
}

// acc[i] += w * (y[i] + b[i]) for i < n; b may be nullptr (no bias).
inline void add_scaled(float* acc, float w, const float* y, const float* b, int64_t n) {
  int64_t i = 0;
  if (b) {
    for (; i + 16 <= n; i += 16) store16(acc + i, load16(acc + i) + w * (load16(y + i) + load16(b + i)));
    for (; i < n; ++i) acc[i] += w * (y[i] + b[i]);
    return;
  }
  for (; i + 16 <= n; i += 16) store16(acc + i, load16(acc + i) + w * load16(y + i));
  for (; i < n; ++i) acc[i] += w * y[i];
}

}  // namespace activation_body
}  // namespace
}  // namespace ktjax
