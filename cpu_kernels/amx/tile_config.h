// The one tile configuration the AMX code here uses: palette 1, tiles 0-7 of 16 rows x 64
// bytes. Include after <immintrin.h> or, in emulated builds, amx_emulation.h (whose macros
// stand in for the tile instructions).
#pragma once
#include <cstdint>

namespace ktjax {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "AMX tile configuration is 64 bytes");

// Configures this thread's tiles (zeroing them); pair with _tile_release().
inline void configure_tiles() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);
}

}  // namespace ktjax
