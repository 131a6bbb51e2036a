// The AMX compute roofline of this machine, measured: every pool thread issuing int8 tile
// products back to back, no loads (int8 TOPS). Benchmarks report AMX prefill against it from
// the same run: on a shared host it moves between instances by 2x
// (docs/kernel-notes.md#amx-roofline; scripts/amx_peak.cpp breaks it down by where the
// operands live).
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <stdexcept>

#include "cpu_kernels/amx/tile_config.h"
#include "cpu_kernels/isa.h"
#include "cpu_kernels/roofline/roofline.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {

double amx_tile_peak_tops(int64_t products, int reps) {
  if (products < 4 || reps < 1) throw std::invalid_argument("amx_tile_peak_tops: needs products >= 4 and reps >= 1");
  if (detected_isa() != Isa::Amx) throw std::runtime_error("amx_tile_peak_tops: this CPU or OS offers no AMX");
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    // Timed over the whole parallel_for: no barrier inside it (its chunks need not run at
    // once), and waking the pool costs microseconds against milliseconds of products.
    std::atomic<int64_t> workers{0};
    const auto start = std::chrono::steady_clock::now();
    parallel_for(num_threads(), [&](int64_t, int64_t) {
      configure_tiles();
      ++workers;
      // Four independent accumulators cover a product's latency.
      for (int64_t i = 0; i < products; i += 4) {
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      _tile_release();
    });
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, workers.load() * ((products + 3) / 4 * 4) * (16.0 * 16 * 64 * 2) / sec / 1e12);
  }
  return best;
}

}  // namespace ktjax
