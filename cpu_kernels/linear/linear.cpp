#include "cpu_kernels/linear/linear.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <memory>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_kernels/numa.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {

const LinearKernels& kernels_for(Isa isa) {
  switch (clamp_isa(isa)) {
    case Isa::Amx: return kernels_amx();
    case Isa::Avx512: return kernels_avx512();
    case Isa::Avx2: return kernels_avx2();
    case Isa::Generic: break;
  }
  return kernels_generic();
}

const LinearKernels& reference_kernels(Isa like) {
  const LinearKernels& g = kernels_generic();
  static const LinearKernels amx_formula{g.prepare, g.gemm, 0, kernels_amx().bf16_group_tokens};
  return clamp_isa(like) == Isa::Amx ? amx_formula : g;
}

void size_acts(const LinearKernels& kern, const PackedWeight& w, int64_t t, QuantActs* a, int64_t layout_t) {
  const int64_t n = layout_t > 0 ? layout_t : t;
  // Group-scaled int weights go to bf16 only in whole 32-k steps (every GGUF type and pack
  // format has them); others keep int8 rows, untiled.
  const bool grouped = w.kind != WeightKind::BF16 && w.scale_enc != ScaleEnc::Row;
  const bool to_bf16 = grouped && kern.bf16_group_tokens > 0 && n >= kern.bf16_group_tokens && w.kp % 32 == 0;
  a->t = t;
  a->kp = w.kp;
  a->group = w.group;
  a->bf16 = w.kind == WeightKind::BF16 || to_bf16;
  a->tiled = kern.tile_tokens > 0 && n >= kern.tile_tokens && (!grouped || to_bf16);
  const int64_t rows = (t + 15) / 16 * 16;
  const int64_t bytes = rows * (a->tiled ? a->steps() * 64 : a->row_bytes());
  if (a->bf16) {
    a->bf.resize(static_cast<size_t>(bytes / 2));
  } else {
    a->q.resize(static_cast<size_t>(bytes));
    a->scale.resize(static_cast<size_t>(rows * w.groups()));
    a->bsum.resize(a->scale.size());
    a->row_bsum.resize(static_cast<size_t>(w.scale_enc == ScaleEnc::Row ? rows : 0));
  }
}

void copy_act_row(const QuantActs& src, int64_t r, QuantActs* dst, int64_t i) {
  if (src.bf16 != dst->bf16 || src.kp != dst->kp) throw std::logic_error("copy_act_row: activation layouts differ");
  const uint8_t* s = src.bf16 ? reinterpret_cast<const uint8_t*>(src.bf.data())
                              : reinterpret_cast<const uint8_t*>(src.q.data());
  uint8_t* d = src.bf16 ? reinterpret_cast<uint8_t*>(dst->bf.data()) : reinterpret_cast<uint8_t*>(dst->q.data());
  // A row's 64-byte pieces lie 64 bytes apart row-major, 1 KiB apart tiled. Whole pieces
  // copy with a constant size (inlined moves, not a memcpy call each): the MoE's gather of
  // DeepSeek-V3-shape rows, qlen 1024 x top-8, took 2.3-2.7 ms instead of 3.1-4.7 (int8_row)
  // and 4.6-5.1 instead of 6.0-7.6 (bf16), runs interleaved on the AMX host.
  s += src.offset(r, 0);
  d += dst->offset(i, 0);
  const int64_t n = src.row_bytes(), ss = src.tiled ? 1024 : 64, ds = dst->tiled ? 1024 : 64;
  int64_t j = 0;
  for (; j + 64 <= n; j += 64, s += ss, d += ds) std::memcpy(d, s, 64);
  if (j < n) std::memcpy(d, s, n - j);
  if (src.bf16) return;
  const int64_t groups = src.kp / src.group;
  std::memcpy(&dst->scale[i * groups], &src.scale[r * groups], groups * 4);
  std::memcpy(&dst->bsum[i * groups], &src.bsum[r * groups], groups * 4);
  if (!src.row_bsum.empty()) dst->row_bsum[i] = src.row_bsum[r];
}

bool prepare_all(const LinearKernels& kern, const PackedWeight& w, const float* x, int64_t t,
                 int64_t ldx, QuantActs* out, int64_t layout_t) {
  size_acts(kern, w, t, out, layout_t);
  if (t * w.k < (int64_t{1} << 16)) return kern.prepare(w, x, 0, t, ldx, out);
  std::atomic<bool> ok{true};
  parallel_for(t, [&](int64_t b, int64_t e) {
    if (!kern.prepare(w, x, b, e, ldx, out)) ok = false;
  });
  return ok;
}

void linear_forward(const PackedWeight& w, const float* x, int64_t t, float* y, Isa isa, bool reference) {
  if (t <= 0) return;
  const LinearKernels& kern = reference ? reference_kernels(isa) : kernels_for(isa);
  // Reused across calls (no allocation in steady state). Bound to a plain reference: a
  // lambda naming the thread_local itself would see each worker's own copy.
  thread_local QuantActs tls_acts;
  QuantActs& acts = tls_acts;
  if (!prepare_all(kern, w, x, t, w.k, &acts))
    throw std::invalid_argument("linear: input x holds NaN or Inf");
  const int64_t rbs = w.row_blocks();
  // Below ~64K multiply-adds a pool wake-up costs more than it saves.
  if (w.np * w.kp * t < (int64_t{1} << 16)) return kern.gemm(w, acts, 0, rbs, y, w.n);
  parallel_for_nodes([&](int node, int nodes, int64_t part, int64_t parts) {
    const auto [r0, r1] = share(rbs, node, nodes);  // the rows in this node's memory
    const auto [b, e] = share(r1 - r0, part, parts);
    if (b < e) kern.gemm(w, acts, r0 + b, r0 + e, y, w.n);
  });
}

double time_linear(const std::vector<const PackedWeight*>& mats, const float* x, int64_t t,
                   float* y, Isa isa, int iters) {
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) linear_forward(*mats[i % mats.size()], x, t, y, isa);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
}

double read_bandwidth_gbps(int64_t bytes, int reps) {
  if (bytes <= 0) bytes = std::max(int64_t{1} << 30, 8 * last_level_cache_bytes());
  // Pieces of 2 MiB claimed in order by the pool's threads, as the kernels claim row blocks:
  // on the AMX host 16 threads reading one equal share each of 4 GiB read 95-105 GB/s, and
  // 131-146 claiming pieces in order (with 1 to 8 streams per piece).
  constexpr int64_t kPieceWords = 1 << 18;
  const int64_t pieces = std::max<int64_t>(1, bytes / 8 / kPieceWords), words = pieces * kPieceWords;
  std::unique_ptr<uint64_t, AlignedFree> buf(static_cast<uint64_t*>(std::aligned_alloc(64, words * 8)));
  if (!buf) throw std::bad_alloc();
  std::memset(buf.get(), 1, words * 8);
  const uint64_t* p = buf.get();
  std::atomic<uint64_t> sink{0};  // keeps the sums live
  const bool vector = detected_isa() >= Isa::Avx2;
  double best = 0;
  for (int r = 0; r < reps; ++r) {
    const auto start = std::chrono::steady_clock::now();
    parallel_for_each(pieces, [&](int64_t b, int64_t e) {
      uint64_t s = 0;
      if (vector) {
        s = sum_words_avx2(p + b * kPieceWords, (e - b) * kPieceWords);
      } else {
        for (int64_t i = b * kPieceWords; i < e * kPieceWords; ++i) s += p[i];
      }
      sink.fetch_add(s, std::memory_order_relaxed);
    });
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    best = std::max(best, static_cast<double>(words * 8) / s / 1e9);
  }
  return best;
}

}  // namespace ktjax
