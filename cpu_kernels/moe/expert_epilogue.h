// What an expert set computes beyond its three matrices: the activation between gate/up and
// down, and optional per-expert biases of each projection (gpt-oss). Stored with the set
// (StoredWeight::epilogue), so every caller of the fused MoE (the FFI call, the stream-ordered
// host job) runs the same experts without passing them.
#pragma once

#include <cstdint>
#include <vector>

namespace ktjax {

enum class ExpertActivation : int32_t {
  kSilu = 0,       // silu(g) * u
  kSwigluOai = 1,  // gpt-oss: g' = min(g, limit), u' = clamp(u, +-limit): g' sigmoid(alpha g') (u' + 1)
};

struct GatedActivation {
  ExpertActivation kind = ExpertActivation::kSilu;
  float alpha = 1.f, limit = 0.f;  // kSwigluOai only
};

struct ExpertEpilogue {
  GatedActivation act;
  // gate [E, I], up [E, I], down [E, H] float32, expert-major; empty: no bias.
  std::vector<float> bias[3];
  int64_t rows[3] = {0, 0, 0};  // I, I, H: a bias row's length

  // Expert e's bias row of projection `which` (0 gate, 1 up, 2 down), or nullptr.
  const float* row(int which, int64_t e) const {
    return bias[which].empty() ? nullptr : bias[which].data() + e * rows[which];
  }
};

}  // namespace ktjax
