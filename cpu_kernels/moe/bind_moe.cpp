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

void bind_moe(py::module_& m) {
  m.def(
      "pack_experts_gguf",
      [](py::array gate, int gate_type, py::array up, int up_type, py::array down, int down_type,
         int64_t experts, int64_t hidden, int64_t inter, const std::string& float_fmt) {
        size_t gb, ub, db;
        const uint8_t *g = bytes_of(gate, &gb), *u = bytes_of(up, &ub), *d = bytes_of(down, &db);
        std::shared_ptr<StoredWeight> sw;
        {
          py::gil_scoped_release nogil;
          sw = pack_experts_gguf(g, gb, gate_type, u, ub, up_type, d, db, down_type, experts, hidden, inter,
                                 float_fmt);
        }
        return store_put(std::move(sw));
      },
      py::arg("gate"), py::arg("gate_type"), py::arg("up"), py::arg("up_type"), py::arg("down"),
      py::arg("down_type"), py::arg("experts"), py::arg("hidden"), py::arg("inter"),
      py::arg("float_format") = "int8",
      "Repacks GGUF expert tensors (gate/up [E, I, H], down [E, H, I]) into the store.");
  m.def(
      "pack_experts_float",
      [](Arr<float> gate, Arr<float> up, Arr<float> down, const std::string& fmt) {
        if (gate.ndim() != 3 || up.ndim() != 3 || down.ndim() != 3)
          throw std::invalid_argument("expert weights must be 3-D: gate/up [E, I, H], down [E, H, I]");
        const int64_t e = gate.shape(0), i = gate.shape(1), h = gate.shape(2);
        if (up.shape(0) != e || up.shape(1) != i || up.shape(2) != h || down.shape(0) != e ||
            down.shape(1) != h || down.shape(2) != i)
          throw std::invalid_argument("expert weight shapes disagree: gate/up [E, I, H], down [E, H, I]");
        return store_put(pack_experts_float(gate.data(), up.data(), down.data(), e, h, i, fmt));
      },
      py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("fmt"),
      "Quantizes float expert weights (int8, int4, bf16) into the store.");
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
