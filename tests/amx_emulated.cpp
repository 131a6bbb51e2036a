// The AMX kernels with the tile instructions emulated in software
// (cpu_kernels/amx/amx_emulation.h), against the scalar reference computing AMX's formula
// (reference_kernels), on any AVX-512 CPU:
//   scripts/amx_emulated.sh
// Linear: each packed format, token counts around the tile sizes and large enough for K
// chunks and token groups, odd N and K, row ranges cut as threads cut them; outputs within
// 1e-4 * (|x| @ |W|^T) and nothing written outside y[:t, :n]. MoE: skewed routing (experts
// above and below 16 tokens), as tests/test_host_amx.py.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cpu_kernels/linear/linear.h"
#include "cpu_kernels/moe/moe.h"
#include "cpu_kernels/quants/blocks.h"
#include "cpu_kernels/quants/ggml_types.h"

namespace ktjax {
// isa.cpp's interface with AMX "detected", so kernels_for(Isa::Amx) reaches the tile kernels.
Isa detected_isa() { return Isa::Amx; }
Isa clamp_isa(Isa requested) { return requested; }
Isa active_isa() { return Isa::Amx; }
void set_isa_override(const std::string&) {}
const char* isa_name(Isa) { return "amx"; }
Isa parse_isa(const std::string&) { return Isa::Amx; }
bool single_stream_decode() { return false; }  // decode tiles as on the AMX host
}  // namespace ktjax

namespace {

using namespace ktjax;

constexpr float kSentinel = -12345.f;
int g_failed = 0, g_checks = 0;

std::vector<float> randn(size_t n, std::mt19937& rng, float scale = 1.f) {
  std::normal_distribution<float> d(0.f, scale);
  std::vector<float> v(n);
  for (float& f : v) f = d(rng);
  return v;
}

void report(bool ok, const std::string& what, double err) {
  ++g_checks;
  g_failed += !ok;
  std::printf("%-4s %s: %.3g\n", ok ? "ok" : "FAIL", what.c_str(), err);
}

// Random GGUF rows with finite scales (f16 1/64 and 1/128).
std::vector<uint8_t> random_gguf(GgmlType type, int64_t n, int64_t k, std::mt19937& rng) {
  const bool q8 = type == GgmlType::Q8_0;
  const int64_t block = q8 ? 32 : 256;
  const bool with_min = type == GgmlType::Q4_K || type == GgmlType::Q5_K;  // d, dmin first
  const int64_t bytes = q8 ? sizeof(BlockQ8_0) : type == GgmlType::Q4_K ? sizeof(BlockQ4_K)
                        : type == GgmlType::Q5_K ? sizeof(BlockQ5_K) : sizeof(BlockQ6_K);
  std::vector<uint8_t> raw(n * k / block * bytes);
  std::uniform_int_distribution<int> u(0, 255);
  for (uint8_t& b : raw) b = static_cast<uint8_t>(u(rng));
  const uint16_t d = 0x2400, dmin = 0x2000;
  for (uint8_t* p = raw.data(); p < raw.data() + raw.size(); p += bytes) {
    std::memcpy(type == GgmlType::Q6_K ? p + offsetof(BlockQ6_K, d) : p, &d, 2);
    if (with_min) std::memcpy(p + offsetof(BlockQ4_K, dmin), &dmin, 2);
  }
  return raw;
}

// y[t, n] with row stride n + 3 and one extra row, filled with a sentinel.
struct Out {
  int64_t ldy;
  std::vector<float> y;
  Out(int64_t t, int64_t n) : ldy(n + 3), y((t + 1) * (n + 3), kSentinel) {}
};

void run_gemm(const LinearKernels& kern, const PackedWeight& w, const std::vector<float>& x, int64_t t,
              const std::vector<int64_t>& cuts, Out* out) {
  QuantActs a;
  if (!prepare_all(kern, w, x.data(), t, w.k, &a)) std::abort();
  for (size_t i = 0; i + 1 < cuts.size(); ++i) kern.gemm(w, a, cuts[i], cuts[i + 1], out->y.data(), out->ldy);
}

void check_linear(const std::string& name, const PackedWeight& w, int64_t t, std::mt19937& rng) {
  const std::vector<float> x = randn(t * w.k, rng);
  Out base(t, w.n);
  const int64_t rbs = w.row_blocks();
  run_gemm(reference_kernels(Isa::Amx), w, x, t, {0, rbs}, &base);
  QuantActs layout;
  size_acts(kernels_amx(), w, t, &layout);
  const bool dequant = layout.bf16 && w.kind != WeightKind::BF16;
  std::vector<float> aw(w.n * w.k);
  for (int64_t j = 0; j < w.n; ++j)
    for (int64_t k = 0; k < w.k; ++k) aw[j * w.k + k] = std::fabs(packed_value(w, j, k));
  std::vector<double> bound(t * w.n);  // |x| @ |W|^T: the scale of an output's rounding error
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < w.n; ++j) {
      double b = 0;
      for (int64_t k = 0; k < w.k; ++k) b += std::fabs(x[i * w.k + k]) * aw[j * w.k + k];
      bound[i * w.n + j] = b;
    }
  // All row blocks in one call, then cut as threads cut them (a range may hold one block).
  std::vector<std::vector<int64_t>> splits = {{0, rbs}};
  if (rbs >= 3) splits.push_back({0, 1, rbs / 2 + 1, rbs});
  for (const std::vector<int64_t>& cuts : splits) {
    Out amx(t, w.n);
    run_gemm(kernels_amx(), w, x, t, cuts, &amx);
    double worst = 0;
    bool inside = true;
    for (int64_t i = 0; i <= t; ++i)
      for (int64_t j = 0; j < amx.ldy; ++j) {
        const float v = amx.y[i * amx.ldy + j];
        if (i == t || j >= w.n) {
          inside = inside && v == kSentinel;
          continue;
        }
        const double err = std::fabs(v - base.y[i * base.ldy + j]) / (bound[i * w.n + j] + 1e-30);
        worst = std::isnan(err) ? INFINITY : std::max(worst, err);
      }
    report(worst <= 1e-4 && inside,
           name + (dequant ? " (bf16)" : "") + " n " + std::to_string(w.n) + " k " + std::to_string(w.k) + " t " + std::to_string(t) + ", " +
               std::to_string(cuts.size() - 1) + " ranges" + (inside ? "" : ", WROTE OUTSIDE y[:t, :n]") +
               "; max |dy| / B",
           worst);
  }
}

void check_moe(const std::string& fmt, int64_t tokens, std::mt19937& rng) {
  const int64_t E = 6, H = 320, I = 208, K = 2;
  auto ex = pack_experts_float(randn(E * I * H, rng, 0.1f).data(), randn(E * I * H, rng, 0.1f).data(),
                               randn(E * H * I, rng, 0.1f).data(), E, H, I, fmt);
  const ExpertSet experts = expert_set(*ex, 0);
  const std::vector<float> x = randn(tokens * H, rng);
  // Expert 0 takes most tokens, the last one every 7th, the others the rest at random.
  std::vector<int32_t> ids(tokens * K);
  std::uniform_int_distribution<int> u(1, E - 2);
  for (int64_t t = 0; t < tokens; ++t) {
    ids[t * K] = t % 7 == 0 ? E - 1 : 0;
    ids[t * K + 1] = u(rng);
  }
  const std::vector<float> wts(tokens * K, 0.5f);
  std::vector<float> y(tokens * H), base(tokens * H);
  MoeArgs args{x.data(), ids.data(), wts.data(), tokens, K, y.data()};
  moe_forward(experts, args, Isa::Amx);
  args.out = base.data();
  moe_forward(experts, args, Isa::Amx, /*reference=*/true);
  double amax = 0, worst = 0;
  for (float v : base) amax = std::max(amax, double(std::fabs(v)));
  for (size_t i = 0; i < y.size(); ++i) {  // rtol 2e-3, atol 2e-3 * max |y|
    const double err = std::fabs(y[i] - base[i]) / (2e-3 * std::fabs(base[i]) + 2e-3 * amax);
    worst = std::isnan(err) ? INFINITY : std::max(worst, err);
  }
  report(worst <= 1, "moe " + fmt + " t " + std::to_string(tokens) + "; max error / tolerance",
         worst);
}

// Batch invariance (the default mode): every token of calls of 2-70 tokens equals, bit for
// bit, the same token computed alone (one token: the AVX-512 decode tiles; from 16 tokens
// int8_row weights take the AMX tiles, the others the AVX-512 prefill tiles).
void check_rows_alone(const std::string& name, const PackedWeight& w, std::mt19937& rng) {
  const int64_t tmax = 70, rbs = w.row_blocks();
  const std::vector<float> x = randn(tmax * w.k, rng);
  std::vector<float> alone(tmax * w.n);
  for (int64_t i = 0; i < tmax; ++i) {
    Out one(1, w.n);
    run_gemm(kernels_amx(), w, std::vector<float>(x.begin() + i * w.k, x.begin() + (i + 1) * w.k), 1, {0, rbs}, &one);
    std::copy(one.y.begin(), one.y.begin() + w.n, alone.begin() + i * w.n);
  }
  for (int64_t t : {2, 15, 16, 17, 33, 64, 70}) {
    Out all(t, w.n);
    run_gemm(kernels_amx(), w, x, t, {0, rbs}, &all);
    int64_t differ = 0;
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < w.n; ++j) differ += all.y[i * all.ldy + j] != alone[i * w.n + j];
    report(differ == 0, name + " t " + std::to_string(t) + ": outputs differing from the token alone", double(differ));
  }
}

void check_moe_rows_alone(const std::string& fmt, std::mt19937& rng) {
  const int64_t E = 6, H = 320, I = 208, K = 2, tokens = 70;
  auto ex = pack_experts_float(randn(E * I * H, rng, 0.1f).data(), randn(E * I * H, rng, 0.1f).data(),
                               randn(E * H * I, rng, 0.1f).data(), E, H, I, fmt);
  const ExpertSet experts = expert_set(*ex, 0);
  const std::vector<float> x = randn(tokens * H, rng);
  std::vector<int32_t> ids(tokens * K);  // expert 0 crowded (>= 16 tokens), the others not
  std::uniform_int_distribution<int> u(1, E - 1);
  for (int64_t t = 0; t < tokens; ++t) ids[t * K] = 0, ids[t * K + 1] = u(rng);
  const std::vector<float> wts(tokens * K, 0.5f);
  std::vector<float> all(tokens * H), one(H);
  moe_forward(experts, MoeArgs{x.data(), ids.data(), wts.data(), tokens, K, all.data()}, Isa::Amx);
  int64_t differ = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    moe_forward(experts, MoeArgs{x.data() + t * H, ids.data() + t * K, wts.data() + t * K, 1, K, one.data()}, Isa::Amx);
    for (int64_t j = 0; j < H; ++j) differ += one[j] != all[t * H + j];
  }
  report(differ == 0, "moe " + fmt + " t 70: outputs differing from the token alone", double(differ));
}

}  // namespace

int main() {
  std::mt19937 rng(1);
  // The AMX tiles for every format they serve (KTJAX_BATCH_INVARIANT=0), against the scalar
  // kernels computing their formula.
  set_batch_invariant(false);
  // k 4000: at 257 and 1024 tokens A outgrows the L2 budget (K chunks; 1024 also forms
  // token groups); k 96 and 1000 pad K.
  for (const auto& [n, k] : std::vector<std::pair<int64_t, int64_t>>{{45, 1000}, {64, 96}, {33, 4000}})
    for (const char* fmt : {"int8_row", "bf16", "int8", "int4"}) {
      const auto w = pack_float(randn(n * k, rng).data(), n, k, fmt);
      for (int64_t t : {15, 16, 17, 33, 128, 257, 1024}) check_linear(fmt, *w, t, rng);
    }
  for (const auto& [type, name] : std::vector<std::pair<GgmlType, const char*>>{
           {GgmlType::Q8_0, "q8_0"}, {GgmlType::Q4_K, "q4_k"}, {GgmlType::Q5_K, "q5_k"}, {GgmlType::Q6_K, "q6_k"}}) {
    const std::vector<uint8_t> raw = random_gguf(type, 40, 768, rng);
    const auto w = pack_gguf(raw.data(), raw.size(), static_cast<int>(type), 40, 768);
    for (int64_t t : {16, 33, 130}) check_linear(name, *w, t, rng);
  }
  for (const char* fmt : {"int8_row", "bf16", "int8", "int4"})
    for (int64_t t : {16, 70, 300}) check_moe(fmt, t, rng);
  // The default, batch-invariant mode: the same checks of the formula, and rows alone.
  set_batch_invariant(true);
  for (const char* fmt : {"int8_row", "bf16", "int8", "int4"}) {
    const auto w = pack_float(randn(45 * 1000, rng).data(), 45, 1000, fmt);
    for (int64_t t : {1, 16, 33}) check_linear(std::string(fmt) + " invariant", *w, t, rng);
    check_rows_alone(std::string(fmt) + " invariant", *w, rng);
    check_moe_rows_alone(fmt, rng);
  }
  {
    const std::vector<uint8_t> raw = random_gguf(GgmlType::Q4_K, 40, 768, rng);
    const auto w = pack_gguf(raw.data(), raw.size(), static_cast<int>(GgmlType::Q4_K), 40, 768);
    check_rows_alone("q4_k invariant", *w, rng);
  }
  std::printf("%d of %d checks failed\n", g_failed, g_checks);
  return g_failed != 0;
}
