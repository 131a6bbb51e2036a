// GGUF tensor data -> float32 / bfloat16, bit-exact with gguf.quants.dequantize.
#pragma once

#include <cstdint>

namespace ktjax {

struct QuantFormat {
  int type;            // ggml type id
  int64_t block_size;  // elements per block
  int64_t type_size;   // bytes per block
};

// Format of a type this module can dequantize, or nullptr.
const QuantFormat* find_quant_format(int type);

// src holds n_blocks blocks of `type` (which must be supported); dst receives
// n_blocks * block_size values. Runs on the thread pool for large inputs.
void dequantize_f32(int type, const uint8_t* src, int64_t n_blocks, float* dst);
// As above, then rounds each float32 to bfloat16 (nearest even), stored as raw bits.
void dequantize_bf16(int type, const uint8_t* src, int64_t n_blocks, uint16_t* dst);

}  // namespace ktjax
