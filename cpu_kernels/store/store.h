// Process-wide store of packed weights, referenced by integer handles from Python and from
// XLA FFI attributes, so weights are loaded once and never travel as XLA buffers.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_kernels/formats/packed.h"
#include "cpu_kernels/moe/expert_epilogue.h"

namespace ktjax {

// A set of equally shaped matrices: one for a dense layer, one per expert (and
// projection) for MoE. Kernels hold a shared_ptr for the whole call, so a concurrent
// release never frees weights in use.
struct StoredWeight {
  std::vector<std::unique_ptr<PackedWeight>> mats;
  // Expert sets only: activation and biases (null: SiLU without biases).
  std::shared_ptr<const ExpertEpilogue> epilogue;
};

int64_t store_put(std::shared_ptr<const StoredWeight> w);
// Stores `w` under the given handle number, as a program compiled in another process names
// it; throws std::invalid_argument when the handle is taken or outside [1, 2^62).
int64_t store_put_at(int64_t handle, std::shared_ptr<const StoredWeight> w);
// Handles given out from now on are at least `first` (an export gives each model its own
// range, so its programs' handle numbers are free in a later process that loads others too).
void store_advance(int64_t first);
// Throws std::invalid_argument("unknown or released weight handle N") when absent.
std::shared_ptr<const StoredWeight> store_get(int64_t handle);
// Same error for an unknown handle.
void store_release(int64_t handle);
int64_t store_size();

}  // namespace ktjax
