#include "cpu_kernels/reduce/argmax.h"

#include <cmath>
#include <vector>

#include "cpu_kernels/float_kernels.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {

void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* ids, Isa isa) {
  const FloatKernels& kern = float_kernels(isa);
  // Long rows (vocabularies) are cut into one chunk per thread, merged in order below.
  const int64_t chunks = n >= (int64_t{1} << 16) ? num_threads() : 1;
  std::vector<float> best(static_cast<size_t>(rows * chunks));
  std::vector<int64_t> at(best.size());
  auto run = [&](int64_t i0, int64_t i1) {
    for (int64_t item = i0; item < i1; ++item) {
      const int64_t row = item / chunks, c = item % chunks;
      kern.argmax(x + row * n, n * c / chunks, n * (c + 1) / chunks, &best[item], &at[item]);
    }
  };
  if (rows * chunks * n < (int64_t{1} << 15)) run(0, rows * chunks);
  else parallel_for(rows * chunks, run);
  for (int64_t row = 0; row < rows; ++row) {
    int64_t pick = row * chunks;
    for (int64_t item = pick + 1; item < (row + 1) * chunks; ++item)
      if (!std::isnan(best[pick]) && (std::isnan(best[item]) || best[item] > best[pick]))
        pick = item;  // earlier chunks win ties
    ids[row] = static_cast<int32_t>(at[pick]);
  }
}

}  // namespace ktjax
