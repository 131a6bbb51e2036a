#include "cpu_kernels/linear/linear.h"

#include <algorithm>
#include <atomic>
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

namespace {
std::atomic<int> g_batch_invariant{-1};  // -1: not read from the environment yet
}  // namespace

bool batch_invariant() {
  int v = g_batch_invariant.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("KTJAX_BATCH_INVARIANT");
    v = env && std::string(env) == "0" ? 0 : 1;
    g_batch_invariant.store(v, std::memory_order_relaxed);
  }
  return v == 1;
}

void set_batch_invariant(bool on) { g_batch_invariant.store(on ? 1 : 0, std::memory_order_relaxed); }

const LinearKernels& reference_kernels(Isa like) {
  const LinearKernels& g = kernels_generic();
  if (clamp_isa(like) != Isa::Amx || batch_invariant()) return g;
  static const LinearKernels amx_formula{g.prepare, g.gemm, 0, kernels_amx().bf16_group_tokens};
  return amx_formula;
}

void size_acts(const LinearKernels& kern, const PackedWeight& w, int64_t t, QuantActs* a, int64_t layout_t) {
  const int64_t n = layout_t > 0 ? layout_t : t;
  // Group-scaled int weights go to bf16 only in whole 32-k steps (every GGUF type and pack
  // format has them); others keep int8 rows, untiled.
  const bool grouped = w.kind != WeightKind::BF16 && w.scale_enc != ScaleEnc::Row;
  // Table (lut) weights stay on int8 rows: the AMX unit's bf16 dequantization has no lookup.
  const bool amx_layout = !w.lut;
  const bool to_bf16 = grouped && amx_layout && kern.bf16_group_tokens > 0 && n >= kern.bf16_group_tokens && w.kp % 32 == 0;
  a->t = t;
  a->kp = w.kp;
  a->group = w.group;
  a->bf16 = w.kind == WeightKind::BF16 || to_bf16;
  a->tiled = kern.tile_tokens > 0 && n >= kern.tile_tokens &&
             (grouped ? to_bf16 : w.kind != WeightKind::BF16 || kern.tile_bf16_weights);
  const int64_t rows = (t + 15) / 16 * 16;
  const int64_t bytes = rows * (a->tiled ? a->steps() * 64 : a->row_bytes());
  if (a->bf16) {
    a->bf.resize(static_cast<size_t>(bytes / 2));
  } else {
    a->q.resize(static_cast<size_t>(bytes));
    a->scale.resize(static_cast<size_t>(rows * w.groups()));
    a->bsum.resize(a->scale.size());
    a->row_bsum.resize(static_cast<size_t>(w.scale_enc == ScaleEnc::Row ? rows : 0));
    a->row_qsum.resize(a->row_bsum.size());
  }
}

void copy_act_row(const QuantActs& src, int64_t r, QuantActs* dst, int64_t i) {
  if (src.bf16 != dst->bf16 || src.kp != dst->kp)
    throw std::logic_error("copy_act_row: activation layouts differ");
  const uint8_t* s = src.bf16 ? reinterpret_cast<const uint8_t*>(src.bf.data())
                              : reinterpret_cast<const uint8_t*>(src.q.data());
  uint8_t* d = src.bf16 ? reinterpret_cast<uint8_t*>(dst->bf.data()) : reinterpret_cast<uint8_t*>(dst->q.data());
  // A row's 64-byte pieces lie 64 bytes apart row-major, 1 KiB apart tiled. Whole pieces
  // copy with a constant size: inlined moves, not a memcpy call each, which the MoE's gather
  // of thousands of rows felt (docs/kernel-notes.md#moe-gather).
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
  if (!src.row_bsum.empty()) dst->row_bsum[i] = src.row_bsum[r], dst->row_qsum[i] = src.row_qsum[r];
}

bool prepare_all(const LinearKernels& kern, const PackedWeight& w, const float* x, int64_t t,
                 int64_t ldx, QuantActs* out, int64_t layout_t) {
  size_acts(kern, w, t, out, layout_t);
  if (t * w.k < (int64_t{1} << 16)) return kern.prepare(w, x, 0, t, ldx, out);
  std::atomic<bool> ok{true};
  parallel_for_balanced(t, [&](int64_t b, int64_t e) {
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
  // Below ~64K multiply-adds a pool wake-up costs more than it saves.
  if (w.np * w.kp * t < (int64_t{1} << 16)) return kern.gemm(w, acts, 0, w.row_blocks(), y, w.n);
  run_gemms(kern, {{&w, &acts, y, t + 2}});
}

// Pieces claimed in memory order rather than one contiguous share per thread, so the threads
// read neighbouring memory, which the memory system serves faster, and a stalled thread
// holds up no one. About kPiecesPerThread pieces per thread, so the last pieces claimed
// leave a short tail. At least kMinPieceBlocks row blocks each where that still leaves
// kMinPiecesPerThread pieces per thread: a piece keeps its A chunks for several row pairs
// (AMX), while a single dense matrix must still fill the pool. Decode (one token per job)
// has no A chunks to keep: its pieces need only the decode tile's 4 row blocks, and shorter
// pieces shorten the tail. Where one long stream reads best (single_stream_decode), decode
// gives each thread one contiguous range instead: short pieces claimed in turn cut every
// thread's stream where the prefetchers must find it again.
// Figures, and the token panels for long dense calls that lost:
// docs/kernel-notes.md#run-gemms.
constexpr int64_t kPiecesPerThread = 16, kMinPiecesPerThread = 4, kMinPieceBlocks = 16,
                  kMinDecodePieceBlocks = 4;

// Row blocks per piece (whole row pairs) for rbs row blocks over `threads` threads.
int64_t piece_blocks(int64_t rbs, int64_t threads, bool decode) {
  int64_t wanted = (rbs + threads - 1) / threads;  // one contiguous range per thread
  if (!decode || !single_stream_decode()) {
    const int64_t least = std::min(decode ? kMinDecodePieceBlocks : kMinPieceBlocks,
                                   rbs / (kMinPiecesPerThread * threads));
    wanted = std::max(least, rbs / (kPiecesPerThread * threads));
  }
  return std::max<int64_t>(1, (wanted + 1) / 2 * 2);
}

uint8_t* thread_scratch(int64_t bytes) {
  thread_local AlignedVector<uint8_t> buf;
  if (static_cast<int64_t>(buf.size()) < bytes) buf.resize(static_cast<size_t>(bytes));
  return buf.data();
}

void run_gemms(const LinearKernels& kern, std::vector<GemmJob> jobs) {
  if (num_nodes() == 1) {
    std::stable_sort(jobs.begin(), jobs.end(),
                     [](const GemmJob& a, const GemmJob& b) { return a.cost_per_rb > b.cost_per_rb; });
    int64_t rbs = 0;
    bool decode = true;
    for (const GemmJob& j : jobs) {
      rbs += j.w->row_blocks();
      decode = decode && j.acts->t == 1;
    }
    const int64_t piece = piece_blocks(rbs, num_threads(), decode);
    struct Piece {
      const GemmJob* job;
      int64_t rb0, rb1;
    };
    std::vector<Piece> pieces;
    for (const GemmJob& j : jobs)
      for (int64_t r = 0; r < j.w->row_blocks(); r += piece)
        pieces.push_back({&j, r, std::min(r + piece, j.w->row_blocks())});
    parallel_for_each(static_cast<int64_t>(pieces.size()), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const Piece& p = pieces[i];
        kern.gemm(*p.job->w, *p.job->acts, p.rb0, p.rb1, p.job->y, p.job->w->n);
      }
    });
    return;
  }
  parallel_for_nodes([&](int node, int nodes, int64_t part, int64_t parts) {
    int64_t total = 0;
    for (const GemmJob& j : jobs) {
      const auto [a, b] = share(j.w->row_blocks(), node, nodes);
      total += j.cost_per_rb * (b - a);
    }
    const auto [lo, hi] = share(total, part, parts);
    int64_t start = 0;
    for (const GemmJob& j : jobs) {
      const auto [a, b] = share(j.w->row_blocks(), node, nodes);
      const int64_t c = j.cost_per_rb, nrb = b - a;
      const int64_t end = start + c * nrb;
      if (end > lo && start < hi) {
        // Row block a + r belongs to the part holding its starting cost start + r * c.
        auto first_at = [&](int64_t v) { return v <= start ? 0 : std::min(nrb, (v - start + c - 1) / c); };
        const int64_t r0 = first_at(lo), r1 = first_at(hi);
        if (r0 < r1) kern.gemm(*j.w, *j.acts, a + r0, a + r1, j.y, j.w->n);
      }
      start = end;
    }
  });
}

}  // namespace ktjax
