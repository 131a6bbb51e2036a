// AMX int8 throughput ceiling of the tile loop the full-K kernels use (linear_amx.cpp: per K
// step, 2 A and 2 B tile loads feed 4 products into 4 C tiles), per thread and over N
// threads pinned one per CPU, with the operands where they would live: tile products alone,
// then A and B from L1, L2 or (B) memory; and variants of that loop (Loop below).
// The benchmark reports its TOPS against these.
// From the repository root (it shares the kernels' tile configuration):
//   g++ -O2 -std=c++17 -mamx-tile -mamx-int8 -pthread -I. scripts/amx_peak.cpp -o amx_peak && ./amx_peak 16
// Needs a CPU with AMX (exits with a message otherwise).
#include <immintrin.h>
#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "cpu_kernels/amx/tile_config.h"

namespace {

constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
constexpr long kIterations = 2000000;

// How the loop feeds the tile products:
//  * Block2x2: per K step, A tiles 4-5 and B tiles 6-7 load into 4 products (C tiles 0-3),
//    as in linear_amx.cpp; StreamB: its B tiles load with the streaming hint (TILELOADDT1).
//  * DoubleBuffered2x1: 2 C tiles (0-1), and two alternating sets of 2 A + 1 B tiles (2-4,
//    5-7), so the next step's loads never write a tile that a product in flight reads: if
//    the core does not rename tiles, this is what overlaps loads with products (at 3 loads
//    per 2 products instead of 1 per product).
//  * Homes2x2: Block2x2 with a C round trip as in the full-K kernel: every 8 K steps the 4
//    C tiles are stored to a buffer and loaded back (the kernel does it once per A chunk,
//    16 steps, so it pays about half of this case's cost).
//  * PrefetchB / PrefetchAB: Block2x2 with software prefetch into L1 (prefetcht0) of the B
//    (and A) tiles 4 steps ahead.
enum class Loop { Block2x2, StreamB, DoubleBuffered2x1, Homes2x2, PrefetchB, PrefetchAB };

// kIterations of the loop, 4 products each, over operands cycling through a_bytes / b_bytes
// of a and b.
template <Loop kLoop>
void run_loop(const uint8_t* a, size_t a_bytes, const uint8_t* b, size_t b_bytes) {
  alignas(64) int32_t homes[4][256];
  size_t ao = 0, bo = 0;
  for (long i = 0; i < kIterations; ++i) {
    if constexpr (kLoop == Loop::DoubleBuffered2x1) {
      _tile_loadd(2, a + ao, 64);
      _tile_loadd(4, b + bo, 64);
      _tile_dpbusd(0, 2, 4);
      _tile_loadd(3, a + ao + 1024, 64);
      _tile_dpbusd(1, 3, 4);
      _tile_loadd(5, a + ao + 2048, 64);
      _tile_loadd(7, b + bo + 1024, 64);
      _tile_dpbusd(0, 5, 7);
      _tile_loadd(6, a + ao + 3072, 64);
      _tile_dpbusd(1, 6, 7);
      ao = ao + 8192 > a_bytes ? 0 : ao + 4096;
    } else {
      if constexpr (kLoop == Loop::PrefetchB || kLoop == Loop::PrefetchAB) {
        const size_t bn = (bo + 4 * 2048) % (b_bytes - 2048), an = (ao + 4 * 2048) % (a_bytes - 2048);
        for (int l = 0; l < 2048; l += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(b + bn + l), _MM_HINT_T0);
          if (kLoop == Loop::PrefetchAB) _mm_prefetch(reinterpret_cast<const char*>(a + an + l), _MM_HINT_T0);
        }
      }
      _tile_loadd(4, a + ao, 64);
      if constexpr (kLoop == Loop::StreamB) _tile_stream_loadd(6, b + bo, 64);
      else _tile_loadd(6, b + bo, 64);
      _tile_dpbusd(0, 4, 6);
      if constexpr (kLoop == Loop::StreamB) _tile_stream_loadd(7, b + bo + 1024, 64);
      else _tile_loadd(7, b + bo + 1024, 64);
      _tile_dpbusd(1, 4, 7);
      _tile_loadd(5, a + ao + 1024, 64);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
      ao = ao + 4096 > a_bytes ? 0 : ao + 2048;
      if (kLoop == Loop::Homes2x2 && i % 8 == 7) {
        _tile_stored(0, homes[0], 64);
        _tile_stored(1, homes[1], 64);
        _tile_stored(2, homes[2], 64);
        _tile_stored(3, homes[3], 64);
        _tile_loadd(0, homes[0], 64);
        _tile_loadd(1, homes[1], 64);
        _tile_loadd(2, homes[2], 64);
        _tile_loadd(3, homes[3], 64);
      }
    }
    bo = bo + 4096 > b_bytes ? 0 : bo + 2048;
  }
}

// run_loop of each Loop, in the enum's order.
constexpr void (*kLoops[])(const uint8_t*, size_t, const uint8_t*, size_t) = {
    &run_loop<Loop::Block2x2>, &run_loop<Loop::StreamB>,   &run_loop<Loop::DoubleBuffered2x1>,
    &run_loop<Loop::Homes2x2>, &run_loop<Loop::PrefetchB>, &run_loop<Loop::PrefetchAB>};

// TOPS of one thread: the loop, operands cycling through buffers of a_bytes /
// b_bytes (0: no loads, the tiles stay put) that start `offset` bytes past a cache line (16:
// every 64-byte tile row straddles two lines, as in a malloc'd buffer).
double thread_tops(Loop loop, size_t a_bytes, size_t b_bytes, size_t offset) {
  ktjax::configure_tiles();
  const bool loads = a_bytes > 0;
  a_bytes = loads ? a_bytes : 8192;
  b_bytes = loads ? b_bytes : 8192;
  std::unique_ptr<uint8_t, decltype(&std::free)> abuf(static_cast<uint8_t*>(std::aligned_alloc(64, a_bytes + 64)), &std::free),
      bbuf(static_cast<uint8_t*>(std::aligned_alloc(64, b_bytes + 64)), &std::free);
  std::memset(abuf.get(), 1, a_bytes + 64);
  std::memset(bbuf.get(), 1, b_bytes + 64);
  const uint8_t *a = abuf.get() + offset, *b = bbuf.get() + offset;
  const auto t0 = std::chrono::steady_clock::now();
  if (!loads) {
    for (long i = 0; i < kIterations; ++i) {
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
  } else {
    kLoops[static_cast<int>(loop)](a, a_bytes, b, b_bytes);
  }
  const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  _tile_release();
  return kIterations * 4.0 * (16 * 16 * 64) * 2 / sec / 1e12;
}

}  // namespace

int main(int argc, char** argv) {
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0 || !__builtin_cpu_supports("amx-int8")) {
    std::puts("amx_peak: this CPU or kernel offers no AMX int8");
    return 1;
  }
  const int threads = argc > 1 ? std::atoi(argv[1]) : 1;
  const struct {
    const char* name;
    Loop loop;
    size_t a, b, offset;
  } cases[] = {{"products only", Loop::Block2x2, 0, 0, 0},
               {"A L1, B L1", Loop::Block2x2, 16 << 10, 16 << 10, 0},
               {"A L1, B L1, rows straddling lines", Loop::Block2x2, 16 << 10, 16 << 10, 16},
               {"A L2, B L1", Loop::Block2x2, 512 << 10, 16 << 10, 0},
               {"A L2, B L2", Loop::Block2x2, 512 << 10, 512 << 10, 0},
               {"A L2, B memory", Loop::Block2x2, 512 << 10, 256 << 20, 0},
               {"A L1, B L2", Loop::Block2x2, 16 << 10, 512 << 10, 0},
               {"A L1, B L2 streamed", Loop::StreamB, 16 << 10, 512 << 10, 0},
               {"A L1 32 KiB, B L2", Loop::Block2x2, 32 << 10, 512 << 10, 0},
               {"A L1, B L2, C round trip per 8 steps", Loop::Homes2x2, 16 << 10, 512 << 10, 0},
               {"A L1 32 KiB, B L2, C round trip per 8 steps", Loop::Homes2x2, 32 << 10, 512 << 10, 0},
               {"2x1 double-buffered, A L1, B L2", Loop::DoubleBuffered2x1, 16 << 10, 512 << 10, 0},
               {"2x1 double-buffered, A L2, B L2", Loop::DoubleBuffered2x1, 512 << 10, 512 << 10, 0},
               {"A L1, B L2 prefetched to L1", Loop::PrefetchB, 16 << 10, 512 << 10, 0},
               {"A L2, B L2, both prefetched to L1", Loop::PrefetchAB, 512 << 10, 512 << 10, 0},
               {"A L2, B memory, both prefetched to L1", Loop::PrefetchAB, 512 << 10, 256 << 20, 0}};
  for (const auto& cs : cases) {
    std::vector<double> tops(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(t, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
        tops[t] = thread_tops(cs.loop, cs.a, cs.b, cs.offset);
      });
    double sum = 0;
    for (int t = 0; t < threads; ++t) pool[t].join(), sum += tops[t];
    std::printf("{\"measure\": \"amx_peak\", \"case\": \"%s\", \"threads\": %d, \"int8_tops\": %.2f}\n", cs.name,
                threads, sum);
  }
  return 0;
}
