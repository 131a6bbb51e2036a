// Fused mixture-of-experts forward on the host (routed experts; shared experts run in XLA):
//   out[t] = sum_j w[t, j] * down_e( silu(gate_e(x[t])) * up_e(x[t]) ),  e = ids[t, j]
// or, for a set stored with an epilogue (expert_epilogue.h), with biases after each projection
// and its activation (gpt-oss's clamped SwiGLU) in place of silu(g) * u.
// Tokens are grouped per expert; every matrix is a PackedWeight run by the linear
// kernels (linear.h), work split across the pool by estimated cost.
#pragma once

#include <cstdint>

#include "cpu_kernels/isa.h"
#include "cpu_kernels/store/store.h"

namespace ktjax {

// An expert set as stored: mats = [gate_0, up_0, down_0, gate_1, ...]; gate/up [I, H],
// down [H, I]; w->epilogue optional. Throws std::invalid_argument if the set is malformed.
struct ExpertSet {
  const StoredWeight* w;
  int64_t experts, hidden, inter;
};
ExpertSet expert_set(const StoredWeight& w, int64_t handle);

// Throws std::invalid_argument naming the problem: a bias not [experts, rows] (gate/up rows =
// inter, down = hidden), NaN/Inf in a bias (when `values`), an unknown activation or bad
// swiglu_oai constants.
void check_epilogue(const ExpertEpilogue& ep, int64_t experts, int64_t hidden, int64_t inter,
                    bool values = true);

constexpr int32_t kSkipExpert = -1;

struct MoeArgs {
  const float* x;        // [t, hidden]
  const int32_t* ids;    // [t, k]
  const float* weights;  // [t, k]
  int64_t t, k;
  float* out;            // [t, hidden]
};

// An expert id of kSkipExpert marks a slot the host does not run (hybrid placement: that
// expert runs on the device); its weight is ignored, and a token whose slots are all skipped
// gets zeros. Throws std::invalid_argument on any other expert id out of range, NaN/Inf in x or weights, or no
// expert at all for a token (k = 0). reference: the scalar kernels computing isa's formula.
void moe_forward(const ExpertSet& experts, const MoeArgs& a, Isa isa, bool reference = false);

// Builds an expert set: per expert, gate and up [inter, hidden] and down [hidden, inter]
// from GGUF data (3-D expert tensors, expert-major; float types become float_fmt) or
// float32.
std::shared_ptr<StoredWeight> pack_experts_gguf(const uint8_t* gate, size_t gate_bytes, int gate_type,
                                                const uint8_t* up, size_t up_bytes, int up_type,
                                                const uint8_t* down, size_t down_bytes, int down_type,
                                                int64_t experts, int64_t hidden, int64_t inter,
                                                const std::string& float_fmt = "int8",
                                                std::shared_ptr<const ExpertEpilogue> epilogue = nullptr);
std::shared_ptr<StoredWeight> pack_experts_float(const float* gate, const float* up, const float* down,
                                                 int64_t experts, int64_t hidden, int64_t inter,
                                                 const std::string& fmt,
                                                 std::shared_ptr<const ExpertEpilogue> epilogue = nullptr);

}  // namespace ktjax
