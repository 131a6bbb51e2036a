// The stacked-matvec body over simd16.h's helpers, compiled per ISA (see simd16.h).
#pragma once

#include "cpu_kernels/matvec/stacked_matvec.h"
#include "cpu_kernels/simd16.h"

namespace ktjax {
namespace {
namespace matvec_body {

// Output rows [r0, r1) of the flattened (group, n) axis, for every input row: each weight
// row is read once and dotted with the (L1-resident) input rows.
template <class W>
void rows_typed(const StackedMatvecProblem& p, int64_t r0, int64_t r1) {
  const W* w = static_cast<const W*>(p.w) + p.layer * p.groups * p.n * p.k;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t g = r / p.n, j = r % p.n;
    for (int64_t m = 0; m < p.rows; ++m)
      p.y[(m * p.groups + g) * p.n + j] = simd16::dot(p.x + (m * p.groups + g) * p.k, w + r * p.k, p.k);
  }
}

inline void rows(const StackedMatvecProblem& p, int64_t r0, int64_t r1) {
  if (p.w_bf16)
    rows_typed<uint16_t>(p, r0, r1);
  else
    rows_typed<float>(p, r0, r1);
}

}  // namespace matvec_body
}  // namespace
}  // namespace ktjax
