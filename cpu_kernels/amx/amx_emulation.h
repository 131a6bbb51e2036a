// Software AMX: the tile intrinsics the AMX kernels use, executed on a per-thread tile file
// with the instructions' semantics (Intel SDM, palette 1), so the tile logic can be tested on
// a CPU without AMX (scripts/amx_emulated.sh). linear_amx.cpp includes it when compiled with
// -DKTJAX_AMX_EMULATE, which the module build never sets. Shapes are checked where the
// hardware raises #UD / #GP; a violation aborts with a message instead.
//
// TDPBF16PS: bf16 inputs are read with DAZ, each product is exact in f32 and added in k
// order with round-to-nearest-even, results flushed to zero (FTZ). Hardware adds the pairs
// in its own order, so compare bf16 results with a tolerance; the int8 dot products are
// exact either way.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace ktjax {
namespace amx_emu {

struct Tile {
  int rows = 0, colsb = 0;
  alignas(64) uint8_t data[16][64] = {};
};

struct TileFile {
  bool configured = false;
  Tile t[8];
};

inline thread_local TileFile g_tiles;

[[noreturn]] inline void fail(const char* what, int tile) {
  std::fprintf(stderr, "amx emulation: %s (tile %d)\n", what, tile);
  std::abort();
}

inline Tile& tile(int i) {
  if (!g_tiles.configured) fail("tile instruction without a configuration", i);
  if (i < 0 || i >= 8 || g_tiles.t[i].rows == 0) fail("tile not configured", i);
  return g_tiles.t[i];
}

inline void loadconfig(const void* cfg) {
  const uint8_t* c = static_cast<const uint8_t*>(cfg);
  if (c[0] != 1) fail("palette other than 1", -1);
  if (c[1] != 0) fail("start_row other than 0", -1);
  g_tiles = TileFile{};
  g_tiles.configured = true;
  for (int i = 0; i < 8; ++i) {
    uint16_t colsb;
    std::memcpy(&colsb, c + 16 + 2 * i, 2);
    const int rows = c[48 + i];
    if (rows > 16 || colsb > 64 || (rows == 0) != (colsb == 0)) fail("bad tile shape", i);
    g_tiles.t[i].rows = rows;
    g_tiles.t[i].colsb = colsb;
  }
}

inline void release() { g_tiles = TileFile{}; }

inline void zero(int i) { std::memset(tile(i).data, 0, sizeof(Tile::data)); }

inline void loadd(int i, const void* base, int64_t stride) {
  Tile& t = tile(i);
  std::memset(t.data, 0, sizeof(Tile::data));
  for (int r = 0; r < t.rows; ++r) std::memcpy(t.data[r], static_cast<const uint8_t*>(base) + r * stride, t.colsb);
}

inline void stored(int i, void* base, int64_t stride) {
  const Tile& t = tile(i);
  for (int r = 0; r < t.rows; ++r) std::memcpy(static_cast<uint8_t*>(base) + r * stride, t.data[r], t.colsb);
}

// c (M x N int32) += a (M x 4K bytes) . b (K x 4N bytes, VNNI quads), each int32 a sum of 4
// byte products; wraps modulo 2^32 as the hardware does.
template <bool kSignedA, bool kSignedB>
inline void dp_int8(int ci, int ai, int bi) {
  Tile &c = tile(ci), &a = tile(ai), &b = tile(bi);
  if (c.rows != a.rows || a.colsb != 4 * b.rows || c.colsb != b.colsb) fail("int8 dot shapes disagree", ci);
  for (int m = 0; m < c.rows; ++m)
    for (int n = 0; n < c.colsb / 4; ++n) {
      uint32_t acc;
      std::memcpy(&acc, c.data[m] + 4 * n, 4);
      for (int k = 0; k < a.colsb / 4; ++k)
        for (int j = 0; j < 4; ++j) {
          const int32_t x = kSignedA ? static_cast<int8_t>(a.data[m][4 * k + j]) : a.data[m][4 * k + j];
          const int32_t w = kSignedB ? static_cast<int8_t>(b.data[k][4 * n + j]) : b.data[k][4 * n + j];
          acc += static_cast<uint32_t>(x * w);
        }
      std::memcpy(c.data[m] + 4 * n, &acc, 4);
    }
}

inline float bf16_daz(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  if ((h & 0x7f80) == 0) h &= 0x8000;  // denormal -> signed zero
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float ftz(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7f800000u) == 0) bits &= 0x80000000u;
  std::memcpy(&f, &bits, 4);
  return f;
}

// c (M x N f32) += a (M x 2K bf16) . b (K x 2N bf16, pairs).
inline void dpbf16(int ci, int ai, int bi) {
  Tile &c = tile(ci), &a = tile(ai), &b = tile(bi);
  if (c.rows != a.rows || a.colsb != 4 * b.rows || c.colsb != b.colsb) fail("bf16 dot shapes disagree", ci);
  for (int m = 0; m < c.rows; ++m)
    for (int n = 0; n < c.colsb / 4; ++n) {
      float acc;
      std::memcpy(&acc, c.data[m] + 4 * n, 4);
      for (int k = 0; k < a.colsb / 4; ++k)
        for (int j = 0; j < 2; ++j)
          acc = ftz(acc + bf16_daz(a.data[m] + 4 * k + 2 * j) * bf16_daz(b.data[k] + 4 * n + 2 * j));
      std::memcpy(c.data[m] + 4 * n, &acc, 4);
    }
}

}  // namespace amx_emu
}  // namespace ktjax

#undef _tile_loadd
#undef _tile_stream_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbssd
#undef _tile_dpbsud
#undef _tile_dpbusd
#undef _tile_dpbuud
#undef _tile_dpbf16ps
// _tile_loadconfig and _tile_release are functions in <immintrin.h>: these macros shadow them.
#define _tile_loadconfig(cfg) ::ktjax::amx_emu::loadconfig(cfg)
#define _tile_release() ::ktjax::amx_emu::release()
#define _tile_loadd(t, base, stride) ::ktjax::amx_emu::loadd(t, base, stride)
// The streaming load's hint (keep out of L1) has no meaning here.
#define _tile_stream_loadd(t, base, stride) ::ktjax::amx_emu::loadd(t, base, stride)
#define _tile_stored(t, base, stride) ::ktjax::amx_emu::stored(t, base, stride)
#define _tile_zero(t) ::ktjax::amx_emu::zero(t)
#define _tile_dpbssd(c, a, b) ::ktjax::amx_emu::dp_int8<true, true>(c, a, b)
#define _tile_dpbsud(c, a, b) ::ktjax::amx_emu::dp_int8<true, false>(c, a, b)
#define _tile_dpbusd(c, a, b) ::ktjax::amx_emu::dp_int8<false, true>(c, a, b)
#define _tile_dpbuud(c, a, b) ::ktjax::amx_emu::dp_int8<false, false>(c, a, b)
#define _tile_dpbf16ps(c, a, b) ::ktjax::amx_emu::dpbf16(c, a, b)
