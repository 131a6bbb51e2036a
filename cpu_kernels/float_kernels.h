// The float kernels (attention, stacked matvec, argmax, MoE element-wise steps) of one ISA
// level: each per-ISA unit (generic/ avx2/ avx512/ float_kernels_*.cpp) compiles the same
// bodies with its flags.
#pragma once

#include <cstdint>

#include "cpu_kernels/attention/attention.h"
#include "cpu_kernels/matvec/stacked_matvec.h"
#include "cpu_kernels/moe/expert_epilogue.h"

namespace ktjax {

struct FloatKernels {
  // Query (b, t), heads [h0, h0 + n) (each with its KV group), over `keys`: writes `part`.
  void (*attend)(const AttentionProblem& p, int64_t b, int64_t t, int64_t h0, int64_t n,
                 KeyRange keys, Partial part);
  // Output rows [r0, r1) of the flattened (group, n) axis.
  void (*matvec_rows)(const StackedMatvecProblem& p, int64_t r0, int64_t r1);
  // First index of the maximum of x[begin, end) (NaN first), and that value.
  void (*argmax)(const float* x, int64_t begin, int64_t end, float* best, int64_t* at);
  // g[0:n] = act(g + gb, u + ub) (the MoE's gated activation); gb / ub nullptr: no bias.
  void (*gated_activation)(const GatedActivation& act, float* g, const float* u, const float* gb,
                           const float* ub, int64_t n);
  // acc[0:n] += w * (y + b); b nullptr: no bias.
  void (*add_scaled)(float* acc, float w, const float* y, const float* b, int64_t n);
};

const FloatKernels& float_kernels_generic();
const FloatKernels& float_kernels_avx2();
const FloatKernels& float_kernels_avx512();

// The kernels of `isa` (AMX machines use AVX-512).
const FloatKernels& float_kernels(Isa isa);

}  // namespace ktjax
