#include "cpu_kernels/matvec/stacked_matvec.h"

#include <cmath>
#include <stdexcept>
#include <string>

#include "cpu_kernels/float_kernels.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {

void stacked_matvec(const StackedMatvecProblem& p, Isa isa) {
  if (p.layer < 0 || p.layer >= p.layers)
    throw std::invalid_argument("layer: index " + std::to_string(p.layer) + " outside the " +
                                std::to_string(p.layers) + " stacked layers");
  const int64_t xs = p.rows * p.groups * p.k;
  for (int64_t i = 0; i < xs; ++i)
    if (!std::isfinite(p.x[i]))
      throw std::invalid_argument("x: holds NaN or Inf (element " + std::to_string(i) + ")");
  const FloatKernels& kern = float_kernels(isa);
  const int64_t out_rows = p.groups * p.n;
  // Below ~64K multiply-adds a pool wake-up costs more than it saves.
  if (out_rows * p.k * p.rows < (int64_t{1} << 16)) return kern.matvec_rows(p, 0, out_rows);
  parallel_for(out_rows, [&](int64_t r0, int64_t r1) { kern.matvec_rows(p, r0, r1); });
}

}  // namespace ktjax
