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
// a_bytes / b_bytes (0: no loads, the tiles stay put).
double thread_tops(size_t a_bytes, size_t b_bytes) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.colsb[i] = 64, cfg.rows[i] = 16;
  _tile_loadconfig(&cfg);
  const bool loads = a_bytes > 0;
  std::vector<uint8_t> a(loads ? a_bytes : 2048, 1), b(loads ? b_bytes : 2048, 1);
  _tile_zero(0);  // tile numbers are literals in the intrinsics' asm
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  _tile_loadd(4, a.data(), 64);
  _tile_loadd(5, a.data() + 1024, 64);
  _tile_loadd(6, b.data(), 64);
  _tile_loadd(7, b.data() + 1024, 64);
  size_t ao = 0, bo = 0;
  const auto t0 = std::chrono::steady_clock::now();
  for (long i = 0; i < kIterations; ++i) {
    if (loads) {
      _tile_loadd(4, a.data() + ao, 64);
      _tile_loadd(6, b.data() + bo, 64);
      _tile_dpbusd(0, 4, 6);
      _tile_loadd(7, b.data() + bo + 1024, 64);
      _tile_dpbusd(1, 4, 7);
      _tile_loadd(5, a.data() + ao + 1024, 64);
      _tile_dpbusd(2, 5, 6);
      _tile_dpbusd(3, 5, 7);
      ao = ao + 4096 > a.size() ? 0 : ao + 2048;
      bo = bo + 4096 > b.size() ? 0 : bo + 2048;
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
    size_t a, b;
  } cases[] = {{"products only", 0, 0},           {"A L1, B L1", 16 << 10, 16 << 10},
               {"A L2, B L1", 512 << 10, 16 << 10}, {"A L2, B L2", 512 << 10, 512 << 10},
               {"A L2, B memory", 512 << 10, 256 << 20}};
  for (const auto& cs : cases) {
    std::vector<double> tops(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t)
      pool.emplace_back([&, t] {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(t, &set);
        pthread_setaffinity_np(pthread_self(), sizeof set, &set);
        tops[t] = thread_tops(cs.a, cs.b);
      });
    double sum = 0;
    for (int t = 0; t < threads; ++t) pool[t].join(), sum += tops[t];
    std::printf("{\"measure\": \"amx_peak\", \"case\": \"%s\", \"threads\": %d, \"int8_tops\": %.2f}\n", cs.name,
                threads, sum);
  }
  return 0;
}
