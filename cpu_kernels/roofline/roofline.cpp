#include "cpu_kernels/roofline/roofline.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "cpu_kernels/formats/packed.h"
#include "cpu_kernels/isa.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {

double read_bandwidth_gbps(int64_t bytes, int reps) {
  if (bytes <= 0) bytes = std::max(int64_t{1} << 30, 8 * last_level_cache_bytes());
  // Pieces of 2 MiB claimed in order by the pool's threads, as the kernels claim row blocks:
  // threads reading neighbouring memory read faster than one distant share each
  // (docs/kernel-notes.md#bandwidth-probe).
  constexpr int64_t kPieceWords = 1 << 18;
  const int64_t pieces = std::max<int64_t>(1, bytes / 8 / kPieceWords), words = pieces * kPieceWords;
  std::unique_ptr<uint64_t, AlignedFree> buf(static_cast<uint64_t*>(std::aligned_alloc(64, words * 8)));
  if (!buf) throw std::bad_alloc();
  std::memset(buf.get(), 1, words * 8);
  const uint64_t* p = buf.get();
  std::atomic<uint64_t> sink{0};  // keeps the sums live
  const bool vector = detected_isa() >= Isa::Avx2;
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    parallel_for_each(pieces, [&](int64_t b, int64_t e) {
      uint64_t s = 0;
      if (vector) {
        s = sum_words_avx2(p + b * kPieceWords, (e - b) * kPieceWords);
      } else {
        for (int64_t i = b * kPieceWords; i < e * kPieceWords; ++i) s += p[i];
      }
      sink.fetch_add(s, std::memory_order_relaxed);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, static_cast<double>(words * 8) / s / 1e9);
  }
  return best;
}

}  // namespace ktjax
