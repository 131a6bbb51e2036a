// Float matrices read in place from a stack of layers: y[m, g, n] = sum_k x[m, g, k] *
// w[layer, g, n, k], for the few rows of a decode step. Inside a scan over layers, XLA
// copies a stacked weight's layer slice before every matmul (a dynamic slice); reading the
// slice where it lies removes that copy (MoE routers, DeepSeek's per-head up-projections).
#pragma once

#include <cstdint>

#include "cpu_kernels/isa.h"

namespace ktjax {

// x f32 [rows, groups, k]; w f32 or bf16 [layers, groups, n, k]; y f32 [rows, groups, n].
struct StackedMatvecProblem {
  const float* x = nullptr;
  const void* w = nullptr;
  bool w_bf16 = false;
  float* y = nullptr;
  int64_t rows = 0, groups = 0, n = 0, k = 0, layer = 0, layers = 0;
};

// Throws std::invalid_argument naming the argument for a layer outside the stack or x holding
// NaN or Inf.
void stacked_matvec(const StackedMatvecProblem& p, Isa isa);

}  // namespace ktjax
