// The argmax body over simd16.h's helpers, compiled per ISA (see simd16.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu_kernels/simd16.h"

namespace ktjax {
namespace {
namespace argmax_body {

using namespace simd16;

// First index of the maximum of x[begin, end) (NaN wins, the first NaN), with its value.
inline void argmax_range(const float* x, int64_t begin, int64_t end, float* best, int64_t* at) {
  int64_t i = begin;
  float bv = x[i];
  int64_t bi = i;
  if (end - begin >= 32) {
    // Lane-wise running maxima; a strict > keeps each lane's first occurrence.
    F32x16 vmax = load16(x + i);
    I32x16 vidx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    I32x16 cur = vidx;
    const I32x16 step = vidx * 0 + 16;
    F32x16 any_nan = vmax - vmax;  // NaN where a NaN was seen
    for (i += 16; i + 16 <= end; i += 16) {
      const F32x16 v = load16(x + i);
      cur += step;
      any_nan += v - v;
      const I32x16 gt = v > vmax;
      vmax = gt ? v : vmax;
      vidx = gt ? cur : vidx;
    }
    bool nan = false;
    for (int l = 0; l < 16; ++l) nan |= std::isnan(any_nan[l]);
    if (nan) {  // rare: find the first NaN by a plain scan
      for (int64_t j = begin; j < end; ++j)
        if (std::isnan(x[j])) {
          *best = x[j];
          *at = j;
          return;
        }
    }
    bv = vmax[0];
    bi = begin + vidx[0];
    for (int l = 1; l < 16; ++l) {
      const int64_t li = begin + vidx[l];
      if (vmax[l] > bv || (vmax[l] == bv && li < bi)) {
        bv = vmax[l];
        bi = li;
      }
    }
  }
  for (; i < end; ++i) {
    if (std::isnan(x[i])) {
      if (!std::isnan(bv)) {
        bv = x[i];
        bi = i;
      }
    } else if (!std::isnan(bv) && x[i] > bv) {
      bv = x[i];
      bi = i;
    }
  }
  *best = bv;
  *at = bi;
}

}  // namespace argmax_body
}  // namespace
}  // namespace ktjax
