// XXH64 (Yann Collet's xxHash, 64-bit variant) and a chunked form of it that hashes large
// buffers on every pool thread: exported weight files are checked against the digests their
// header records before any byte of them is used (ktjax/export/packed_weights.py).
#pragma once

#include <cstddef>
#include <cstdint>

namespace ktjax {

uint64_t xxh64(const uint8_t* p, size_t n, uint64_t seed = 0);

// XXH64 of each `chunk`-byte piece of p[0, n) (the last one shorter), then XXH64 of those
// digests as little-endian 8-byte words. A buffer of at most one chunk hashes to
// xxh64(p, n) itself. chunk > 0.
uint64_t chunked_xxh64(const uint8_t* p, size_t n, size_t chunk);

}  // namespace ktjax
