// Packed weights to and from exported files (ktjax/export/packed_weights.py): a stored
// weight's matrices are described by their layout fields and written as their packed bytes; a
// later process rebuilds them from a file's bytes without dequantizing or repacking. Files are
// untrusted input: a layout is accepted only if it is one the packers produce, each byte count
// must equal what the layout implies, and the bytes must hash to the recorded digest.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "cpu_kernels/formats/packed.h"
#include "cpu_kernels/store/store.h"

namespace ktjax {

struct PackedLayout {
  int kind = 0, scale_enc = 0, group = 0, hi_bits = 0, source_type = -1;
  bool has_min = false;
  int64_t n = 0, k = 0;
  int64_t bytes = 0;  // the packed data's size
};

PackedLayout layout_of(const PackedWeight& w);

// One matrix's bytes as read from a file, with the digest its header records
// (chunked_xxh64 over `chunk`-byte pieces).
struct PackedSource {
  PackedLayout layout;
  const uint8_t* data = nullptr;
  size_t size = 0;
  uint64_t digest = 0;
};

// Rebuilds a stored weight from `sources`: one matrix (a dense weight) or gate, up, down per
// expert (every expert's three matching the first one's layouts, as the packers make them).
// Throws std::invalid_argument naming the matrix and the problem (unknown layout, wrong byte
// count, digest mismatch).
std::shared_ptr<StoredWeight> adopt_packed(const std::vector<PackedSource>& sources, size_t chunk);

}  // namespace ktjax
