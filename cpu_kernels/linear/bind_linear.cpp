// Python bindings of the weight store and linear kernels (direct calls on numpy arrays).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <stdexcept>
#include <string>

#include "cpu_kernels/bindings.h"
#include "cpu_kernels/isa.h"
#include "cpu_kernels/linear/linear.h"
#include "cpu_kernels/store/store.h"

namespace py = pybind11;

namespace ktjax {
namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;

const PackedWeight& dense(const StoredWeight& sw, int64_t handle) {
  if (sw.mats.size() != 1)
    throw std::invalid_argument("weight handle " + std::to_string(handle) +
                                " holds an expert set, not a dense linear weight");
  return *sw.mats[0];
}

int64_t put_one(std::unique_ptr<PackedWeight> w) {
  auto sw = std::make_shared<StoredWeight>();
  sw->mats.push_back(std::move(w));
  return store_put(std::move(sw));
}

Isa isa_arg(const std::string& name) { return name.empty() ? active_isa() : clamp_isa(parse_isa(name)); }

}  // namespace

void bind_linear(py::module_& m) {
  m.def("detected_isa", [] { return std::string(isa_name(detected_isa())); },
        "Highest ISA level of this CPU: generic, avx2, avx512 or amx.");
  m.def("active_isa", [] { return std::string(isa_name(active_isa())); },
        "ISA level kernels use (KTJAX_ISA / set_isa may lower it).");
  m.def("last_level_cache_bytes", &last_level_cache_bytes, "Bytes of the CPU's largest cache.");
  m.def("set_isa", &set_isa_override, py::arg("name"),
        "Forces a lower ISA level for this process ('' restores the detected one).");
  m.def("batch_invariant", &batch_invariant,
        "Whether a token's kernel result is independent of its call's token count (AMX).");
  m.def("set_batch_invariant", &set_batch_invariant, py::arg("on"),
        "Turns batch invariance on or off for this process (KTJAX_BATCH_INVARIANT).");

  m.def(
      "pack_gguf_weight",
      [](py::array raw, int ggml_type, int64_t n, int64_t k, const std::string& float_fmt) {
        if (!raw.dtype().is(py::dtype::of<uint8_t>()) || !(raw.flags() & py::array::c_style))
          throw std::invalid_argument("raw GGUF bytes must be a C-contiguous uint8 array");
        const auto* p = static_cast<const uint8_t*>(raw.data());
        const size_t bytes = static_cast<size_t>(raw.nbytes());
        std::unique_ptr<PackedWeight> w;
        {
          py::gil_scoped_release nogil;
          w = pack_gguf(p, bytes, ggml_type, n, k, float_fmt);
        }
        return put_one(std::move(w));
      },
      py::arg("raw"), py::arg("ggml_type"), py::arg("n"), py::arg("k"), py::arg("float_format") = "int8",
      "Repacks GGUF tensor data of shape (n, k) into the store (F32/F16/BF16 become "
      "float_format); returns its handle.");
  m.def(
      "pack_float_weight",
      [](F32Array w, const std::string& fmt) {
        if (w.ndim() != 2) throw std::invalid_argument("weight must be 2-D [N, K]");
        return put_one(pack_float(w.data(), w.shape(0), w.shape(1), fmt));
      },
      py::arg("w"), py::arg("fmt"), "Quantizes a float [N, K] weight (int8, int4, bf16) into the store.");
  m.def("release_weight", &store_release, py::arg("handle"), "Frees a stored weight.");
  m.def("store_size", &store_size, "Number of live weight handles.");
  m.def(
      "weight_info",
      [](int64_t handle) {
        auto sw = store_get(handle);
        py::dict d;
        const PackedWeight& w = *sw->mats[0];
        d["count"] = sw->mats.size();
        d["n"] = w.n;
        d["k"] = w.k;
        d["format"] = w.describe();
        d["source_type"] = w.source_type;
        int64_t bytes = 0;
        for (const auto& m : sw->mats) bytes += m->bytes();
        d["bytes"] = bytes;
        return d;
      },
      py::arg("handle"), "Shape, format and byte size of a stored weight.");
  m.def(
      "unpack_weight",
      [](int64_t handle, int64_t index) {
        auto sw = store_get(handle);
        if (index < 0 || index >= static_cast<int64_t>(sw->mats.size()))
          throw std::invalid_argument("matrix index " + std::to_string(index) + " out of range");
        const PackedWeight& w = *sw->mats[index];
        py::array_t<float> out({w.n, w.k});
        float* o = out.mutable_data();
        for (int64_t r = 0; r < w.n; ++r)
          for (int64_t c = 0; c < w.k; ++c) o[r * w.k + c] = packed_value(w, r, c);
        return out;
      },
      py::arg("handle"), py::arg("index") = 0, "Decodes a stored weight to float32 [N, K] (exact).");
  m.def(
      "linear_forward",
      [](F32Array x, int64_t handle, const std::string& isa, bool reference) {
        auto sw = store_get(handle);
        const PackedWeight& w = dense(*sw, handle);
        if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D [T, K]");
        if (x.shape(1) != w.k)
          throw std::invalid_argument("x has K=" + std::to_string(x.shape(1)) + ", weight " +
                                      std::to_string(handle) + " expects K=" + std::to_string(w.k));
        const Isa level = isa_arg(isa);
        py::array_t<float> y({static_cast<int64_t>(x.shape(0)), w.n});
        const float* xp = x.data();
        float* yp = y.mutable_data();
        const int64_t t = x.shape(0);
        {
          py::gil_scoped_release nogil;
          linear_forward(w, xp, t, yp, level, reference);
        }
        return y;
      },
      py::arg("x"), py::arg("handle"), py::arg("isa") = "", py::arg("reference") = false,
      "y[T, N] = x[T, K] @ W^T with the given ISA level ('' = active; reference: the scalar "
      "kernels computing its formula).");
  m.def(
      "time_linear",
      [](const std::vector<int64_t>& handles, F32Array x, const std::string& isa, int iters) {
        std::vector<std::shared_ptr<const StoredWeight>> keep;
        std::vector<const PackedWeight*> mats;
        for (int64_t h : handles) {
          keep.push_back(store_get(h));
          mats.push_back(&dense(*keep.back(), h));
          if (mats.back()->k != mats[0]->k || mats.back()->n != mats[0]->n)
            throw std::invalid_argument("time_linear: weights differ in shape");
        }
        if (mats.empty() || x.ndim() != 2 || x.shape(1) != mats[0]->k || iters < 1)
          throw std::invalid_argument("time_linear: need weights, x [T, K] and iters >= 1");
        std::vector<float> y(static_cast<size_t>(x.shape(0) * mats[0]->n));
        const Isa level = isa_arg(isa);
        const float* xp = x.data();
        const int64_t t = x.shape(0);
        py::gil_scoped_release nogil;
        const auto start = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) linear_forward(*mats[i % mats.size()], xp, t, y.data(), level);
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / iters;
      },
      py::arg("handles"), py::arg("x"), py::arg("isa"), py::arg("iters"),
      "Seconds per linear call, rotating over the handles (benchmarks).");
}

}  // namespace ktjax
