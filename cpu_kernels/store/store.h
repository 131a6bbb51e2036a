// Process-wide store of packed weights, referenced by integer handles from Python and from
// XLA FFI attributes, so weights are loaded once and never travel as XLA buffers.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_kernels/formats/packed.h"

namespace ktjax {

// A set of equally shaped matrices: one for a dense layer, one per expert (and
// projection) for MoE. Kernels hold a shared_ptr for the whole call, so a concurrent
// release never frees weights in use.
struct StoredWeight {
  std::vector<std::unique_ptr<PackedWeight>> mats;
};

int64_t store_put(std::shared_ptr<const StoredWeight> w);
// Throws std::invalid_argument("unknown or released weight handle N") when absent.
std::shared_ptr<const StoredWeight> store_get(int64_t handle);
// Same error for an unknown handle.
void store_release(int64_t handle);
int64_t store_size();

}  // namespace ktjax
