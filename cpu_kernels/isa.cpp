#include "cpu_kernels/isa.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <string>
#include <stdexcept>

namespace ktjax {
namespace {

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

// Linux refuses AMX tile instructions until the process asks for the XTILEDATA state.
bool request_amx_permission() {
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

Isa detect() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::Generic;
  const bool osxsave = c & (1u << 27), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave) return Isa::Generic;
  const uint64_t xcr0 = xgetbv0();
  const bool ymm_os = (xcr0 & 0x6) == 0x6;
  const bool zmm_os = (xcr0 & 0xe6) == 0xe6;
  const bool amx_os = (xcr0 & 0x60000) == 0x60000;
  unsigned a7, b7, c7, d7, a71 = 0, b71, c71, d71;
  __cpuid_count(7, 0, a7, b7, c7, d7);
  __cpuid_count(7, 1, a71, b71, c71, d71);
  const bool avx2 = b7 & (1u << 5);
  const bool avx512 = (b7 & (1u << 16)) && (b7 & (1u << 17)) && (b7 & (1u << 30)) &&
                      (b7 & (1u << 31)) && (c7 & (1u << 11)) && (a71 & (1u << 5));
  const bool amx = (d7 & (1u << 24)) && (d7 & (1u << 25)) && (d7 & (1u << 22));
  if (!(ymm_os && avx2 && fma && f16c)) return Isa::Generic;
  if (!(zmm_os && avx512)) return Isa::Avx2;
  if (!(amx_os && amx && request_amx_permission())) return Isa::Avx512;
  return Isa::Amx;
}

bool is_amd() {
  unsigned a, b, c, d;
  if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
  return b == 0x68747541 && d == 0x69746e65 && c == 0x444d4163;  // "Auth" "enti" "cAMD"
}

// -1: none; otherwise an Isa value. Set from KTJAX_ISA on first use.
std::atomic<int> g_override{-2};

}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

bool single_stream_decode() {
  static const bool amd = is_amd();
  return amd;
}

Isa clamp_isa(Isa requested) {
  return static_cast<int>(requested) < static_cast<int>(detected_isa()) ? requested
                                                                        : detected_isa();
}

Isa active_isa() {
  int o = g_override.load(std::memory_order_relaxed);
  if (o == -2) {
    const char* env = std::getenv("KTJAX_ISA");
    o = (env && *env) ? static_cast<int>(clamp_isa(parse_isa(env))) : -1;
    g_override.store(o, std::memory_order_relaxed);
  }
  return o < 0 ? detected_isa() : static_cast<Isa>(o);
}

void set_isa_override(const std::string& name) {
  g_override.store(name.empty() ? -1 : static_cast<int>(clamp_isa(parse_isa(name))));
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Generic: return "generic";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Amx: return "amx";
  }
  return "?";
}

Isa parse_isa(const std::string& name) {
  for (Isa i : {Isa::Generic, Isa::Avx2, Isa::Avx512, Isa::Amx})
    if (name == isa_name(i)) return i;
  throw std::invalid_argument("unknown ISA '" + name +
                              "' (KTJAX_ISA accepts generic, avx2, avx512, amx)");
}

int64_t last_level_cache_bytes() {
  // Read with stdio: on the AMX host reading it through std::ifstream crashed once numpy had
  // been imported (sysconf agreed with sysfs there, but reports the whole chip's L3 inside
  // some virtual machines).
  int64_t best = 0;
  for (int i = 0; i < 8; ++i) {  // sizes read "32768K"
    const std::string path = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/size";
    FILE* f = std::fopen(path.c_str(), "r");
    if (!f) continue;
    long long v = 0;
    char unit = 0;
    const int got = std::fscanf(f, "%lld%c", &v, &unit);
    std::fclose(f);
    if (got >= 1 && v > 0)
      best = std::max<int64_t>(best, v << (unit == 'K' ? 10 : unit == 'M' ? 20 : unit == 'G' ? 30 : 0));
  }
  return best > 0 ? best : int64_t{32} << 20;
}

}  // namespace ktjax
