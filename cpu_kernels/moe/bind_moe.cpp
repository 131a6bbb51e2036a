// Python bindings of the fused MoE kernel (direct calls on numpy arrays).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <stdexcept>
#include <string>

#include "cpu_kernels/bindings.h"
#include "cpu_kernels/moe/moe.h"
#include "cpu_kernels/thread_pool.h"

namespace py = pybind11;

namespace ktjax {
namespace {

template <class T>
using Arr = py::array_t<T, py::array::c_style | py::array::forcecast>;

const uint8_t* bytes_of(const py::array& a, size_t* n) {
  if (!a.dtype().is(py::dtype::of<uint8_t>()) || !(a.flags() & py::array::c_style))
    throw std::invalid_argument("raw GGUF bytes must be a C-contiguous uint8 array");
  *n = static_cast<size_t>(a.nbytes());
  return static_cast<const uint8_t*>(a.data());
}

struct Call {
  std::shared_ptr<const StoredWeight> sw;
  ExpertSet ex{};
  MoeArgs args{};
};

std::vector<float> bias_from(const py::dict& spec, const char* key, int64_t* rows) {
  if (!spec.contains(key) || spec[key].is_none()) return {};
  if (!py::isinstance<py::array>(spec[key]))
    throw std::invalid_argument(std::string(key) + " must be a float32 [experts, rows] numpy array or None");
  const py::array a = spec[key].cast<py::array>();
  if (!a.dtype().is(py::dtype::of<float>()))
    throw std::invalid_argument(std::string(key) + " must be float32, got " + py::str(a.dtype()).cast<std::string>());
  if (a.ndim() != 2)
    throw std::invalid_argument(std::string(key) + " must be 2-D [experts, rows], got " +
                                std::to_string(a.ndim()) + " dimensions");
  *rows = a.shape(1);
  const Arr<float> c = Arr<float>::ensure(a);  // C order
  return std::vector<float>(c.data(), c.data() + c.size());
}

Call make_call(const Arr<float>& x, const Arr<int32_t>& ids, const Arr<float>& wts, int64_t handle) {
  Call c;
  c.sw = store_get(handle);
  c.ex = expert_set(*c.sw, handle);
  if (x.ndim() != 2 || x.shape(1) != c.ex.hidden)
    throw std::invalid_argument("x must be [T, " + std::to_string(c.ex.hidden) + "]");
  if (ids.ndim() != 2 || ids.shape(0) != x.shape(0))
    throw std::invalid_argument("expert_ids must be [T, k] with T = " + std::to_string(x.shape(0)));
  if (wts.ndim() != 2 || wts.shape(0) != ids.shape(0) || wts.shape(1) != ids.shape(1))
    throw std::invalid_argument("expert_weights must have the shape of expert_ids");
  c.args = {x.data(), ids.data(), wts.data(), x.shape(0), ids.shape(1), nullptr};
  return c;
}

}  // namespace

std::shared_ptr<const ExpertEpilogue> epilogue_from_py(const py::object& spec) {
  if (spec.is_none()) return nullptr;
  if (!py::isinstance<py::dict>(spec))
    throw std::invalid_argument("an expert epilogue must be None or a dict (activation, alpha, limit, *_bias)");
  const py::dict d = spec.cast<py::dict>();
  for (auto item : d) {
    const std::string key = py::str(item.first);
    if (key != "activation" && key != "alpha" && key != "limit" && key != "gate_bias" && key != "up_bias" &&
        key != "down_bias")
      throw std::invalid_argument("unknown expert epilogue field '" + key + "'");
  }
  auto ep = std::make_shared<ExpertEpilogue>();
  const std::string act = d.contains("activation") ? py::str(d["activation"]).cast<std::string>() : "silu";
  if (act == "silu") {
    ep->act.kind = ExpertActivation::kSilu;
  } else if (act == "swiglu_oai") {
    ep->act.kind = ExpertActivation::kSwigluOai;
  } else {
    throw std::invalid_argument("unknown expert activation '" + act + "'; expected 'silu' or 'swiglu_oai'");
  }
  ep->act.alpha = d.contains("alpha") ? d["alpha"].cast<float>() : 1.f;
  ep->act.limit = d.contains("limit") ? d["limit"].cast<float>() : 0.f;
  const char* keys[3] = {"gate_bias", "up_bias", "down_bias"};
  for (int i = 0; i < 3; ++i) ep->bias[i] = bias_from(d, keys[i], &ep->rows[i]);
  return ep;
}

void bind_moe(py::module_& m) {
  m.def(
      "pack_experts_gguf",
      [](py::array gate, int gate_type, py::array up, int up_type, py::array down, int down_type,
         int64_t experts, int64_t hidden, int64_t inter, const std::string& float_fmt,
         const py::object& epilogue) {
        size_t gb, ub, db;
        const uint8_t *g = bytes_of(gate, &gb), *u = bytes_of(up, &ub), *d = bytes_of(down, &db);
        auto epi = epilogue_from_py(epilogue);
        std::shared_ptr<StoredWeight> sw;
        {
          py::gil_scoped_release nogil;
          sw = pack_experts_gguf(g, gb, gate_type, u, ub, up_type, d, db, down_type, experts, hidden, inter,
                                 float_fmt, std::move(epi));
        }
        return store_put(std::move(sw));
      },
      py::arg("gate"), py::arg("gate_type"), py::arg("up"), py::arg("up_type"), py::arg("down"),
      py::arg("down_type"), py::arg("experts"), py::arg("hidden"), py::arg("inter"),
      py::arg("float_format") = "int8", py::arg("epilogue") = py::none(),
      "Repacks GGUF expert tensors (gate/up [E, I, H], down [E, H, I]) into the store, with an "
      "optional epilogue (see pack_experts_float).");
  m.def(
      "pack_experts_float",
      [](Arr<float> gate, Arr<float> up, Arr<float> down, const std::string& fmt, const py::object& epilogue) {
        if (gate.ndim() != 3 || up.ndim() != 3 || down.ndim() != 3)
          throw std::invalid_argument("expert weights must be 3-D: gate/up [E, I, H], down [E, H, I]");
        const int64_t e = gate.shape(0), i = gate.shape(1), h = gate.shape(2);
        if (up.shape(0) != e || up.shape(1) != i || up.shape(2) != h || down.shape(0) != e ||
            down.shape(1) != h || down.shape(2) != i)
          throw std::invalid_argument("expert weight shapes disagree: gate/up [E, I, H], down [E, H, I]");
        return store_put(pack_experts_float(gate.data(), up.data(), down.data(), e, h, i, fmt,
                                            epilogue_from_py(epilogue)));
      },
      py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("fmt"), py::arg("epilogue") = py::none(),
      "Quantizes float expert weights (int8, int4, bf16) into the store. epilogue: None (silu(g) * u) "
      "or a dict: activation 'silu' | 'swiglu_oai' (with alpha, limit), gate_bias / up_bias [E, I] "
      "and down_bias [E, H], float32 or None.");
  m.def(
      "expert_epilogue",
      [](int64_t handle) -> py::object {
        auto sw = store_get(handle);
        expert_set(*sw, handle);
        const ExpertEpilogue* ep = sw->epilogue.get();
        if (ep == nullptr) return py::none();
        py::dict d;
        d["activation"] = ep->act.kind == ExpertActivation::kSwigluOai ? "swiglu_oai" : "silu";
        d["alpha"] = ep->act.alpha;
        d["limit"] = ep->act.limit;
        const char* keys[3] = {"gate_bias", "up_bias", "down_bias"};
        for (int i = 0; i < 3; ++i) {
          if (ep->bias[i].empty()) {
            d[keys[i]] = py::none();
            continue;
          }
          py::array_t<float> a({static_cast<int64_t>(ep->bias[i].size()) / ep->rows[i], ep->rows[i]});
          std::copy(ep->bias[i].begin(), ep->bias[i].end(), a.mutable_data());
          d[keys[i]] = a;
        }
        return d;
      },
      py::arg("handle"), "An expert set's epilogue as pack_experts_float takes it, or None.");
  m.def(
      "moe_forward",
      [](Arr<float> x, Arr<int32_t> ids, Arr<float> wts, int64_t handle, const std::string& isa,
         bool reference) {
        Call c = make_call(x, ids, wts, handle);
        const Isa level = isa.empty() ? active_isa() : clamp_isa(parse_isa(isa));
        py::array_t<float> out({c.args.t, c.ex.hidden});
        c.args.out = out.mutable_data();
        py::gil_scoped_release nogil;
        moe_forward(c.ex, c.args, level, reference);
        return out;
      },
      py::arg("x"), py::arg("expert_ids"), py::arg("expert_weights"), py::arg("handle"),
      py::arg("isa") = "", py::arg("reference") = false,
      "Fused MoE on numpy arrays: out[T, H] (reference: the scalar kernels computing isa's formula).");
  m.def(
      "time_moe",
      [](Arr<float> x, const std::vector<Arr<int32_t>>& ids, Arr<float> wts,
         const std::vector<int64_t>& handles, int iters) {
        if (ids.size() != handles.size() || handles.empty() || iters < 1)
          throw std::invalid_argument("time_moe: one expert_ids array per layer handle, iters >= 1");
        std::vector<Call> calls;
        for (size_t i = 0; i < handles.size(); ++i) calls.push_back(make_call(x, ids[i], wts, handles[i]));
        std::vector<float> out(static_cast<size_t>(calls[0].args.t * calls[0].ex.hidden));
        const Isa level = active_isa();
        py::gil_scoped_release nogil;
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) {
          Call& c = calls[i % calls.size()];
          c.args.out = out.data();
          moe_forward(c.ex, c.args, level);
        }
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
      },
      py::arg("x"), py::arg("expert_ids"), py::arg("expert_weights"), py::arg("handles"), py::arg("iters"),
      "Seconds per MoE call, rotating over layers, each with its own routing (benchmarks).");
  m.def(
      "time_parallel_for",
      [](int iters) {
        if (iters < 1) throw std::invalid_argument("time_parallel_for: iters must be >= 1");
        std::vector<int64_t> sink(static_cast<size_t>(num_threads()) * 16);
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i)
          parallel_for(num_threads(), [&](int64_t b, int64_t e) { sink[b * 16] += e; });
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
      },
      py::arg("iters"), py::call_guard<py::gil_scoped_release>(),
      "Seconds per parallel_for of one empty task per thread (pool wake-up overhead).");
}

}  // namespace ktjax
