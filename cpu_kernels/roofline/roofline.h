// The machine's ceilings, measured where the benchmarks run (scripts/bench_*.py, roofline.py):
// kernel figures are reported against a ceiling from the same run, since a shared host drifts
// between runs. The kernels never call these.
#pragma once

#include <cstdint>

namespace ktjax {

// Read bandwidth of all pool threads in GB/s, summing a buffer of `bytes` (<= 0: at least
// 1 GiB and 8 times the last-level cache), best of `reps`.
double read_bandwidth_gbps(int64_t bytes, int reps);

// The AMX compute roofline in int8 TOPS: all pool threads issuing `products` tile products
// each with no loads, best of `reps` (amx/tile_peak.cpp). Throws std::runtime_error on a
// machine without AMX.
double amx_tile_peak_tops(int64_t products, int reps);

// Sum of n 64-bit words with 256-bit loads (the bandwidth probe's reader; AVX2 only,
// avx2/read_words_avx2.cpp).
uint64_t sum_words_avx2(const uint64_t* p, int64_t n);

}  // namespace ktjax
