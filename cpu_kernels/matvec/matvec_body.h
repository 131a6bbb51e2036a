// The stacked-matvec body over simd16.h's helpers, compiled per ISA (see simd16.h).
#pragma once

#include "cpu_kernels/matvec/stacked_matvec.h"
#include "cpu_kernels/simd16.h"

namespace ktjax {
namespace {
namespace matvec_body {

// Input rows per pass over the weight rows: a block of them stays in L1/L2 while the weight
// rows stream past, so prefill-sized calls do not re-read every input row per weight row.
constexpr int64_t kInputRows = 8;

// Output rows [r0, r1) of the flattened (group, n) axis, for every input row. Each (input
// row, weight row) pair is one dot in one order, however many rows the call has.
template <class W>
void rows_typed(const StackedMatvecProblem& p, int64_t r0, int64_t r1) {
  const W* w = static_cast<const W*>(p.w) + p.layer * p.groups * p.n * p.k;
  for (int64_t m0 = 0; m0 < p.rows; m0 += kInputRows) {
    const int64_t m1 = m0 + kInputRows < p.rows ? m0 + kInputRows : p.rows;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = r / p.n, j = r % p.n;
      for (int64_t m = m0; m < m1; ++m)
        p.y[(m * p.groups + g) * p.n + j] = simd16::dot(p.x + (m * p.groups + g) * p.k, w + r * p.k, p.k);
    }
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
