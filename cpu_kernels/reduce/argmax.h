// Row argmax on the host for greedy sampling: XLA CPU splits a 262k-wide reduction into about
// eleven small operations; one pass here reads the row once (docs/kernel-notes.md#argmax).
#pragma once

#include <cstdint>

#include "cpu_kernels/isa.h"

namespace ktjax {

// First index of each row's maximum of x [rows, n] (NaN counts as the maximum, as
// jnp.argmax), written to ids [rows]; n >= 1.
void argmax_rows(const float* x, int64_t rows, int64_t n, int32_t* ids, Isa isa);

}  // namespace ktjax
