// The bandwidth probe's reader (roofline/roofline.h), compiled with AVX2.
#include <immintrin.h>

#include "cpu_kernels/roofline/roofline.h"

namespace ktjax {

uint64_t sum_words_avx2(const uint64_t* p, int64_t n) {
  // One stream prefetched 2 KiB ahead: it read as much as several streams per piece, and
  // most steadily (docs/kernel-notes.md#bandwidth-probe).
  __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const char* q = reinterpret_cast<const char*>(p + i);
    _mm_prefetch(q + 2048, _MM_HINT_T0);
    _mm_prefetch(q + 2112, _MM_HINT_T0);
    const __m256i* v = reinterpret_cast<const __m256i*>(q);
    a0 = _mm256_add_epi64(a0, _mm256_add_epi64(_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)));
    a1 = _mm256_add_epi64(a1, _mm256_add_epi64(_mm256_loadu_si256(v + 2), _mm256_loadu_si256(v + 3)));
  }
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(a0, a1));
  uint64_t s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < n; ++i) s += p[i];
  return s;
}

}  // namespace ktjax
