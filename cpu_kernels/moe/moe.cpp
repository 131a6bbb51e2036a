#include "cpu_kernels/moe/moe.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels/float_kernels.h"
#include "cpu_kernels/linear/linear.h"
#include "cpu_kernels/moe/activation_reference.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {
namespace {

std::string shape_str(const PackedWeight& w) {
  return "[" + std::to_string(w.n) + ", " + std::to_string(w.k) + "]";
}

// Copies rows `rows` of prepared activations src into dst (sized for rows.size()).
void gather_acts(const QuantActs& src, const std::vector<int64_t>& rows, QuantActs* dst) {
  for (size_t i = 0; i < rows.size(); ++i) copy_act_row(src, rows[i], dst, static_cast<int64_t>(i));
}

bool same_layout(const PackedWeight& a, const PackedWeight& b) {
  return a.kind == b.kind && a.group == b.group && a.kp == b.kp && a.k == b.k && a.lut == b.lut &&
         std::memcmp(a.lut_biased, b.lut_biased, sizeof(a.lut_biased)) == 0;
}

// Per-call scratch, reused across calls on the same thread.
struct Scratch {
  std::vector<std::vector<int64_t>> rows;  // tokens of each active expert slot
  std::vector<int64_t> slot_of;            // expert -> slot, or -1
  std::vector<int64_t> pos;                // (t, j) -> row in its expert's list
  std::vector<QuantActs> acts_in, acts_up, acts_h;
  std::vector<std::vector<float>> yg, yu, yd;
  QuantActs all_x;
  QuantActs all_x_untiled;  // int8 rows for experts below the tile size when all_x is bf16
};

}  // namespace

void check_epilogue(const ExpertEpilogue& ep, int64_t experts, int64_t hidden, int64_t inter, bool values) {
  const char* names[3] = {"gate_bias", "up_bias", "down_bias"};
  const int64_t rows[3] = {inter, inter, hidden};
  for (int i = 0; i < 3; ++i) {
    if (ep.bias[i].empty()) continue;
    if (ep.rows[i] != rows[i] || static_cast<int64_t>(ep.bias[i].size()) != experts * rows[i])
      throw std::invalid_argument(std::string(names[i]) + " must be float32 [" + std::to_string(experts) +
                                  ", " + std::to_string(rows[i]) + "], got " +
                                  std::to_string(ep.bias[i].size()) + " values");
    for (size_t j = 0; values && j < ep.bias[i].size(); ++j)
      if (!std::isfinite(ep.bias[i][j]))
        throw std::invalid_argument(std::string(names[i]) + " holds NaN or Inf (element " + std::to_string(j) + ")");
  }
  if (ep.act.kind != ExpertActivation::kSilu && ep.act.kind != ExpertActivation::kSwigluOai)
    throw std::invalid_argument("unknown expert activation code " + std::to_string(static_cast<int>(ep.act.kind)));
  if (ep.act.kind == ExpertActivation::kSwigluOai &&
      !(std::isfinite(ep.act.alpha) && std::isfinite(ep.act.limit) && ep.act.limit > 0.f))
    throw std::invalid_argument("swiglu_oai needs a finite alpha and a finite limit > 0, got alpha " +
                                std::to_string(ep.act.alpha) + ", limit " + std::to_string(ep.act.limit));
}

ExpertSet expert_set(const StoredWeight& w, int64_t handle) {
  const size_t m = w.mats.size();
  if (m == 0 || m % 3 != 0)
    throw std::invalid_argument("weight handle " + std::to_string(handle) +
                                " is not an expert set (gate, up, down per expert)");
  const PackedWeight& g = *w.mats[0];
  ExpertSet s{&w, static_cast<int64_t>(m / 3), g.k, g.n};
  for (size_t e = 0; e < m / 3; ++e) {
    const PackedWeight &ge = *w.mats[3 * e], &ue = *w.mats[3 * e + 1], &de = *w.mats[3 * e + 2];
    if (ge.n != s.inter || ge.k != s.hidden || ue.n != s.inter || ue.k != s.hidden ||
        de.n != s.hidden || de.k != s.inter)
      throw std::invalid_argument("expert " + std::to_string(e) + " of handle " + std::to_string(handle) +
                                  " has shapes gate " + shape_str(ge) + ", up " + shape_str(ue) +
                                  ", down " + shape_str(de));
  }
  if (w.epilogue) check_epilogue(*w.epilogue, s.experts, s.hidden, s.inter, false);  // values: at pack
  return s;
}

void moe_forward(const ExpertSet& ex, const MoeArgs& a, Isa isa, bool reference) {
  const int64_t T = a.t, K = a.k, H = ex.hidden;
  if (T < 0 || K < 1)
    throw std::invalid_argument("moe: " + std::to_string(K) + " experts per token for " +
                                std::to_string(T) + " tokens: every token needs at least one expert");
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t e = a.ids[i];
    if (e == kSkipExpert) continue;  // its weight is ignored
    if (e < 0 || e >= ex.experts)
      throw std::invalid_argument("expert id " + std::to_string(e) + " at token " + std::to_string(i / K) +
                                  ", slot " + std::to_string(i % K) + " is out of range [0, " +
                                  std::to_string(ex.experts) + ")");
    if (!std::isfinite(a.weights[i]))
      throw std::invalid_argument("routing weight at token " + std::to_string(i / K) + ", slot " +
                                  std::to_string(i % K) + " is NaN or Inf");
  }
  if (T == 0) return;
  if (K == 0) return std::fill(a.out, a.out + T * H, 0.f);  // no expert per token: a zero sum
  const LinearKernels& kern = reference ? reference_kernels(isa) : kernels_for(isa);
  thread_local Scratch tls;
  Scratch& s = tls;  // a plain reference: lambdas must not name the thread_local

  // Group tokens per expert: one slot per expert used, in order of first use.
  s.slot_of.assign(ex.experts, -1);
  s.pos.resize(T * K);
  std::vector<int64_t> slot_expert;  // slot -> expert
  int64_t slots = 0;
  for (int64_t i = 0; i < T * K; ++i) {
    const int32_t e = a.ids[i];
    if (e == kSkipExpert) continue;
    if (s.slot_of[e] < 0) {
      s.slot_of[e] = slots++;
      slot_expert.push_back(e);
      if (static_cast<int64_t>(s.rows.size()) < slots) s.rows.emplace_back();
      s.rows[slots - 1].clear();
    }
    std::vector<int64_t>& rows = s.rows[s.slot_of[e]];
    // A token routed twice to one expert (not expected) just appears twice.
    s.pos[i] = static_cast<int64_t>(rows.size());
    rows.push_back(i / K);
  }
  if (slots == 0) return std::fill(a.out, a.out + T * H, 0.f);  // every slot skipped
  auto mat = [&](int64_t slot, int which) -> const PackedWeight& {
    return *ex.w->mats[3 * slot_expert[slot] + which];
  };
  auto ntok = [&](int64_t slot) { return static_cast<int64_t>(s.rows[slot].size()); };

  // Quantize x once per distinct input layout, then gather each expert's rows.
  const PackedWeight& g0 = mat(0, 0);
  if (!prepare_all(kern, g0, a.x, T, H, &s.all_x)) throw std::invalid_argument("moe: input x holds NaN or Inf");
  if (static_cast<int64_t>(s.acts_in.size()) < slots) {
    s.acts_in.resize(slots);
    s.acts_up.resize(slots);
    s.acts_h.resize(slots);
    s.yg.resize(slots);
    s.yu.resize(slots);
    s.yd.resize(slots);
  }
  std::vector<const QuantActs*> in(slots), in_up(slots);
  std::vector<int64_t> to_gather;  // slots whose token rows are copied out of all_x
  bool need_untiled = false;
  for (int64_t sl = 0; sl < slots; ++sl) {
    const PackedWeight &gw = mat(sl, 0), &uw = mat(sl, 1);
    const bool in_order = ntok(sl) == T && [&] {
      for (int64_t i = 0; i < T; ++i)
        if (s.rows[sl][i] != i) return false;
      return true;
    }();
    if (in_order) {
      in[sl] = &s.all_x;  // every token in order: no copy
    } else {
      size_acts(kern, gw, ntok(sl), &s.acts_in[sl]);
      to_gather.push_back(sl);
      in[sl] = &s.acts_in[sl];
      need_untiled = need_untiled || s.acts_in[sl].bf16 != s.all_x.bf16;
    }
    in_up[sl] = in[sl];
    if (!same_layout(gw, uw)) {  // up packed differently from gate: quantize for it
      std::vector<float> xr(ntok(sl) * H);
      for (int64_t i = 0; i < ntok(sl); ++i)
        std::memcpy(&xr[i * H], a.x + s.rows[sl][i] * H, H * 4);
      prepare_all(kern, uw, xr.data(), ntok(sl), H, &s.acts_up[sl]);
      in_up[sl] = &s.acts_up[sl];
    }
    s.yg[sl].resize(ntok(sl) * gw.n);
    s.yu[sl].resize(ntok(sl) * uw.n);
  }
  // The source is all_x, or its int8 rows for experts with too few tokens for bf16 tiles.
  if (need_untiled) prepare_all(kern, g0, a.x, T, H, &s.all_x_untiled, 1);
  parallel_for_each(static_cast<int64_t>(to_gather.size()), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      QuantActs& dst = s.acts_in[to_gather[i]];
      gather_acts(dst.bf16 == s.all_x.bf16 ? s.all_x : s.all_x_untiled, s.rows[to_gather[i]], &dst);
    }
  });

  // gate and up projections of every active expert in one pass over the pool.
  std::vector<GemmJob> jobs;
  for (int64_t sl = 0; sl < slots; ++sl) {
    jobs.push_back({&mat(sl, 0), in[sl], s.yg[sl].data(), ntok(sl) + 2});
    jobs.push_back({&mat(sl, 1), in_up[sl], s.yu[sl].data(), ntok(sl) + 2});
  }
  run_gemms(kern, jobs);

  // h = act(gate + bias, up + bias) (silu(gate) * up by default), quantized for the down projection, threaded over the rows of all
  // slots together (a few experts with many tokens each must still fill the pool).
  std::vector<int64_t> first_row(slots + 1, 0);
  for (int64_t sl = 0; sl < slots; ++sl) {
    size_acts(kern, mat(sl, 2), ntok(sl), &s.acts_h[sl]);
    s.yd[sl].resize(ntok(sl) * H);
    first_row[sl + 1] = first_row[sl] + ntok(sl);
  }
  const FloatKernels& fk = float_kernels(isa);
  // reference: the element-wise steps in scalar code too
  const auto gated_activation = reference ? &activation_reference::gated_activation : fk.gated_activation;
  const auto add_scaled = reference ? &activation_reference::add_scaled : fk.add_scaled;
  const ExpertEpilogue* epi = ex.w->epilogue.get();
  const GatedActivation act = epi ? epi->act : GatedActivation{};
  parallel_for_balanced(first_row[slots], [&](int64_t b, int64_t e) {
    for (int64_t sl = 0; sl < slots; ++sl) {
      const int64_t r0 = std::max(b, first_row[sl]) - first_row[sl];
      const int64_t r1 = std::min(e, first_row[sl + 1]) - first_row[sl];
      if (r0 >= r1) continue;
      const int64_t n = mat(sl, 0).n;
      float* g = s.yg[sl].data();
      const float* u = s.yu[sl].data();
      const float* gb = epi ? epi->row(0, slot_expert[sl]) : nullptr;
      const float* ub = epi ? epi->row(1, slot_expert[sl]) : nullptr;
      if (!gb && !ub)  // no bias: the slot's rows as one run
        gated_activation(act, g + r0 * n, u + r0 * n, nullptr, nullptr, (r1 - r0) * n);
      else
        for (int64_t r = r0; r < r1; ++r) gated_activation(act, g + r * n, u + r * n, gb, ub, n);
      if (!kern.prepare(mat(sl, 2), g, r0, r1, n, &s.acts_h[sl]))
        throw std::invalid_argument("moe: expert activations overflowed to NaN or Inf");
    }
  });

  jobs.clear();
  for (int64_t sl = 0; sl < slots; ++sl)
    jobs.push_back({&mat(sl, 2), &s.acts_h[sl], s.yd[sl].data(), ntok(sl) + 2});
  run_gemms(kern, jobs);

  // Weighted sum per token, slots in routing order: deterministic for any thread count.
  parallel_for_balanced(T, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* o = a.out + t * H;
      std::fill(o, o + H, 0.f);
      for (int64_t j = 0; j < K; ++j) {
        const int32_t ej = a.ids[t * K + j];
        if (ej == kSkipExpert) continue;
        add_scaled(o, a.weights[t * K + j], s.yd[s.slot_of[ej]].data() + s.pos[t * K + j] * H,
                      epi ? epi->row(2, ej) : nullptr, H);
      }
    }
  });
}

std::shared_ptr<StoredWeight> pack_experts_gguf(const uint8_t* gate, size_t gate_bytes, int gate_type,
                                                const uint8_t* up, size_t up_bytes, int up_type,
                                                const uint8_t* down, size_t down_bytes, int down_type,
                                                int64_t experts, int64_t hidden, int64_t inter,
                                                const std::string& float_fmt,
                                                std::shared_ptr<const ExpertEpilogue> epilogue) {
  if (experts <= 0) throw std::invalid_argument("need at least one expert");
  if (epilogue) check_epilogue(*epilogue, experts, hidden, inter);
  for (size_t b : {gate_bytes, up_bytes, down_bytes})
    if (b % experts != 0)
      throw std::invalid_argument("expert tensor of " + std::to_string(b) + " bytes does not split into " +
                                  std::to_string(experts) + " experts");
  auto sw = std::make_shared<StoredWeight>();
  const size_t gb = gate_bytes / experts, ub = up_bytes / experts, db = down_bytes / experts;
  for (int64_t e = 0; e < experts; ++e) {
    sw->mats.push_back(pack_gguf(gate + e * gb, gb, gate_type, inter, hidden, float_fmt));
    sw->mats.push_back(pack_gguf(up + e * ub, ub, up_type, inter, hidden, float_fmt));
    sw->mats.push_back(pack_gguf(down + e * db, db, down_type, hidden, inter, float_fmt));
  }
  sw->epilogue = std::move(epilogue);
  return sw;
}

std::shared_ptr<StoredWeight> pack_experts_float(const float* gate, const float* up, const float* down,
                                                 int64_t experts, int64_t hidden, int64_t inter,
                                                 const std::string& fmt,
                                                 std::shared_ptr<const ExpertEpilogue> epilogue) {
  if (experts <= 0) throw std::invalid_argument("need at least one expert");
  if (epilogue) check_epilogue(*epilogue, experts, hidden, inter);
  auto sw = std::make_shared<StoredWeight>();
  const int64_t m = hidden * inter;
  for (int64_t e = 0; e < experts; ++e) {
    sw->mats.push_back(pack_float(gate + e * m, inter, hidden, fmt));
    sw->mats.push_back(pack_float(up + e * m, inter, hidden, fmt));
    sw->mats.push_back(pack_float(down + e * m, hidden, inter, fmt));
  }
  sw->epilogue = std::move(epilogue);
  return sw;
}

}  // namespace ktjax
