// AMX int8 throughput ceiling of the tile loop the full-K kernels use (linear_amx.cpp: per K
// step, 2 A and 2 B tile loads feed 4 products into 4 C tiles), per thread and over N
// threads pinned one per CPU, with the operands where they would live: tile products alone,
// then A and B from L1, L2 or (B) memory. The benchmark reports its TOPS against these.
//   g++ -O2 -std=c++17 -mamx-tile -mamx-int8 -pthread scripts/amx_peak.cpp -o amx_peak && ./amx_peak 16
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

namespace {

constexpr int kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
constexpr long kIterations = 2000000;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// TOPS of one thread: kIterations K steps of 4 products, operands cycling through buffers of
// a_bytes / b_bytes (0: no loads, the tiles stay put) that start `offset` bytes past a cache
// line (16: every 64-byte tile row straddles two lines, as in a malloc'd buffer).
double thread_tops(size_t a_bytes, size_t b_bytes, size_t offset) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
  const bool loads = a_bytes > 0;
  a_bytes = loads ? a_bytes : 2048;
  b_bytes = loads ? b_bytes : 2048;
  std::unique_ptr<uint8_t, decltype(&std::free)> abuf(static_cast<uint8_t*>(std::aligned_alloc(64, a_bytes + 64)), &std::free),
      bbuf(static_cast<uint8_t*>(std::aligned_alloc(64, b_bytes + 64)), &std::free);
  std::memset(abuf.get(), 1, a_bytes + 64);
  std::memset(bbuf.get(), 1, b_bytes + 64);
  const uint8_t *a = abuf.get() + offset, *b = bbuf.get() + offset;
  _tile_zero(0);  // tile numbers are literals in the intrinsics' asm
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a, 64);
  _tile_loadd(5, a + 1024, 64);
  _tile_loadd(6, b, 64);
  _tile_loadd(7, b + 1024, 64);
  size_t ao = 0, bo = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < kIterations; ++i) {
    if (loads) {
      _tile_loadd(4, a + ao, 64);
      _tile_loadd(6, b + bo, 64);
      _tile_dpbusd(0, 4, 6);
      _tile_loadd(7, b + bo + 1024, 64);
      _tile_dpbusd(1, 4, 7);
      _tile_loadd(5, a + ao + 1024, 64);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
      ao = ao + 4096 > a_bytes ? 0 : ao + 2048;
      bo = bo + 4096 > b_bytes ? 0 : bo + 2048;
    } else {
      _tile_dpbusd(0, 4, 6);
      _tile_dpbusd(1, 4, 7);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
    }
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
    size_t a, b, offset;
  } cases[] = {{"products only", 0, 0, 0},
               {"A L1, B L1", 16 << 10, 16 << 10, 0},
               {"A L1, B L1, rows straddling lines", 16 << 10, 16 << 10, 16},
               {"A L2, B L1", 512 << 10, 16 << 10, 0},
               {"A L2, B L2", 512 << 10, 512 << 10, 0},
               {"A L2, B memory", 512 << 10, 256 << 20, 0}};
  for (const auto& cs : cases) {
    std::vector<double> tops(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(t, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
        tops[t] = thread_tops(cs.a, cs.b, cs.offset);
      });
    double sum = 0;
    for (int t = 0; t < threads; ++t) pool[t].join(), sum += tops[t];
    std::printf("{\"measure\": \"amx_peak\", \"case\": \"%s\", \"threads\": %d, \"int8_tops\": %.2f}\n", cs.name,
                threads, sum);
  }
  return 0;
}
