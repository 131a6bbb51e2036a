// Python bindings of packed-weight export and import (cpu_kernels/store/serialize.h).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "cpu_kernels/bindings.h"
#include "cpu_kernels/moe/moe.h"
#include "cpu_kernels/store/hash64.h"
#include "cpu_kernels/store/serialize.h"

namespace py = pybind11;

namespace ktjax {
namespace {

const uint8_t* uint8_data(const py::array& a, size_t* n) {
  if (!a.dtype().is(py::dtype::of<uint8_t>()) || !(a.flags() & py::array::c_style))
    throw std::invalid_argument("bytes must be a C-contiguous uint8 array");
  *n = static_cast<size_t>(a.nbytes());
  return static_cast<const uint8_t*>(a.data());
}

py::dict layout_dict(const PackedLayout& l) {
  py::dict d;
  d["kind"] = l.kind;
  d["scale_enc"] = l.scale_enc;
  d["has_min"] = l.has_min;
  d["group"] = l.group;
  d["hi_bits"] = l.hi_bits;
  d["source_type"] = l.source_type;
  d["n"] = l.n;
  d["k"] = l.k;
  d["bytes"] = l.bytes;
  return d;
}

template <class T>
T field(const py::dict& d, const char* key) {
  if (!d.contains(key)) throw std::invalid_argument(std::string("packed layout lacks the field '") + key + "'");
  return d[key].cast<T>();
}

PackedLayout layout_from(const py::dict& d) {
  PackedLayout l;
  l.kind = field<int>(d, "kind");
  l.scale_enc = field<int>(d, "scale_enc");
  l.has_min = field<bool>(d, "has_min");
  l.group = field<int>(d, "group");
  l.hi_bits = field<int>(d, "hi_bits");
  l.source_type = field<int>(d, "source_type");
  l.n = field<int64_t>(d, "n");
  l.k = field<int64_t>(d, "k");
  l.bytes = field<int64_t>(d, "bytes");
  return l;
}

}  // namespace

void bind_store_io(py::module_& m) {
  m.def(
      "hash64",
      [](const py::array& buf, size_t chunk) {
        size_t n;
        const uint8_t* p = uint8_data(buf, &n);
        py::gil_scoped_release nogil;
        return chunked_xxh64(p, n, chunk);
      },
      py::arg("buf"), py::arg("chunk") = size_t{1} << 22,
      "XXH64 of a uint8 buffer, hashed in `chunk`-byte pieces on the pool threads (the "
      "digests then hashed together; one piece: plain XXH64).");
  m.def(
      "packed_layout",
      [](int64_t handle) {
        auto sw = store_get(handle);
        py::list out;
        for (const auto& w : sw->mats) out.append(layout_dict(layout_of(*w)));
        return out;
      },
      py::arg("handle"), "Layout fields of each packed matrix of a stored weight.");
  m.def(
      "packed_bytes",
      [](int64_t handle, int64_t index) {
        auto sw = store_get(handle);
        if (index < 0 || index >= static_cast<int64_t>(sw->mats.size()))
          throw std::invalid_argument("matrix index " + std::to_string(index) + " out of range");
        const PackedWeight& w = *sw->mats[static_cast<size_t>(index)];
        // A read-only view that keeps the stored weight alive while it exists.
        auto* keep = new std::shared_ptr<const StoredWeight>(sw);
        py::capsule owner(keep, [](void* p) { delete static_cast<std::shared_ptr<const StoredWeight>*>(p); });
        py::array_t<uint8_t> view({w.bytes()}, {int64_t{1}}, w.data.get(), owner);
        py::detail::array_proxy(view.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
        return view;
      },
      py::arg("handle"), py::arg("index") = 0, "The packed bytes of one matrix, a read-only view.");
  m.def("store_advance", &store_advance, py::arg("first"),
        "Handles given out from now on are at least `first`.");
  m.def(
      "adopt_packed",
      [](const std::vector<py::dict>& layouts, const std::vector<py::array>& buffers,
         const std::vector<uint64_t>& digests, int64_t handle, size_t chunk, const py::object& epilogue) {
        if (layouts.size() != buffers.size() || layouts.size() != digests.size())
          throw std::invalid_argument("adopt_packed: one layout, buffer and digest per matrix");
        if (chunk == 0) throw std::invalid_argument("adopt_packed: chunk must be positive");
        std::vector<PackedSource> sources(layouts.size());
        for (size_t i = 0; i < layouts.size(); ++i) {
          sources[i].layout = layout_from(layouts[i]);
          sources[i].data = uint8_data(buffers[i], &sources[i].size);
          sources[i].digest = digests[i];
        }
        auto epi = epilogue_from_py(epilogue);
        std::shared_ptr<StoredWeight> sw;
        {
          py::gil_scoped_release nogil;
          sw = adopt_packed(sources, chunk);
        }
        if (epi) {  // an expert set's activation and biases, checked against its shapes
          const ExpertSet ex = expert_set(*sw, handle);
          check_epilogue(*epi, ex.experts, ex.hidden, ex.inter);
          sw->epilogue = std::move(epi);
        }
        return handle == 0 ? store_put(std::move(sw)) : store_put_at(handle, std::move(sw));
      },
      py::arg("layouts"), py::arg("buffers"), py::arg("digests"), py::arg("handle") = 0,
      py::arg("chunk") = size_t{1} << 22, py::arg("epilogue") = py::none(),
      "Stores a weight rebuilt from packed bytes (each checked against its layout and digest), "
      "an expert set with its `epilogue` (see pack_experts_float), "
      "under `handle` (0: the next free one; else that number, which must be free: compiled "
      "programs name their weights by handle); returns the handle.");
}

}  // namespace ktjax
