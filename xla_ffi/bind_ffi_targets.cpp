#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_kernels/bindings.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/moe_site.h"

namespace py = pybind11;

namespace ktjax {

void bind_ffi_targets(py::module_& m) {
  m.def(
      "ffi_targets",
      [] {
        py::dict targets;
        targets["ktjax_rms_norm_f32"] = py::capsule(reinterpret_cast<void*>(&KtjaxRmsNormF32));
        targets["ktjax_linear_layered"] =
            py::capsule(reinterpret_cast<void*>(&KtjaxLinearLayered));
        targets["ktjax_moe_layered"] = py::capsule(reinterpret_cast<void*>(&KtjaxMoeLayered));
        targets["ktjax_paged_attention"] =
            py::capsule(reinterpret_cast<void*>(&KtjaxPagedAttention));
        targets["ktjax_argmax"] = py::capsule(reinterpret_cast<void*>(&KtjaxArgmax));
        targets["ktjax_stacked_matvec"] =
            py::capsule(reinterpret_cast<void*>(&KtjaxStackedMatvec));
        targets["ktjax_moe_submit"] = py::capsule(reinterpret_cast<void*>(&KtjaxMoeSubmit));
        targets["ktjax_moe_wait"] = py::capsule(reinterpret_cast<void*>(&KtjaxMoeWait));
        targets["ktjax_moe_after"] = py::capsule(reinterpret_cast<void*>(&KtjaxMoeAfter));
        return targets;
      },
      "CPU XLA FFI handlers: {target name: PyCapsule} for jax.ffi.register_ffi_target.");
  m.def(
      "cuda_ffi_targets",
      [] {
        py::dict targets;
        targets["ktjax_moe_layered"] = py::capsule(reinterpret_cast<void*>(&KtjaxMoeLayeredCuda));
        targets["ktjax_linear_layered"] =
            py::capsule(reinterpret_cast<void*>(&KtjaxLinearLayeredCuda));
        targets["ktjax_moe_submit"] = py::capsule(reinterpret_cast<void*>(&KtjaxMoeSubmitCuda));
        targets["ktjax_moe_wait"] = py::capsule(reinterpret_cast<void*>(&KtjaxMoeWaitCuda));
        targets["ktjax_moe_after"] = py::capsule(reinterpret_cast<void*>(&KtjaxMoeAfter));
        return targets;
      },
      "CUDA-platform handlers of the host targets (operands staged through host memory).");
  m.def(
      "moe_site_reserve",
      [](int64_t tokens, int64_t hidden, int64_t top_k, const std::vector<int64_t>& handles, bool pinned,
         int64_t at) {
        const MoeSite& s = reserve_moe_site(tokens, hidden, top_k, handles, pinned, at);
        return py::make_tuple(s.id, s.pinned);
      },
      py::arg("tokens"), py::arg("hidden"), py::arg("top_k"), py::arg("handles"), py::arg("pinned"),
      py::arg("at") = 0,
      "Reserves the host buffers of one ktjax_moe_submit/wait call site under id `at` (0: the next "
      "free one): (site id, pinned).");
  m.def("moe_site_advance", &advance_moe_sites, py::arg("first"),
        "Site ids given out from now on are at least `first`.");
  m.def(
      "moe_site_run_async",
      [](int64_t site_id, py::array_t<float, py::array::c_style | py::array::forcecast> x,
         py::array_t<int32_t, py::array::c_style | py::array::forcecast> ids,
         py::array_t<float, py::array::c_style | py::array::forcecast> weights, int32_t layer,
         double timeout_s) {
        MoeSite* s = find_moe_site(site_id);
        if (s == nullptr) throw std::invalid_argument("no host MoE site " + std::to_string(site_id));
        if (x.size() != s->tokens * s->hidden || ids.size() != s->tokens * s->top_k ||
            weights.size() != ids.size())
          throw std::invalid_argument("operand sizes do not match site " + std::to_string(site_id));
        std::memcpy(s->x, x.data(), s->x_bytes());
        std::memcpy(s->ids, ids.data(), s->route_bytes());
        std::memcpy(s->weights, weights.data(), s->route_bytes());
        *s->layer = layer;
        py::array_t<float> out({s->tokens, s->hidden});
        {
          py::gil_scoped_release nogil;
          submit_moe_job(s);  // what the CUDA host functions call, in their order
          wait_moe_job(s, timeout_s);
        }
        std::memcpy(out.mutable_data(), s->out, s->x_bytes());
        return out;
      },
      py::arg("site"), py::arg("x"), py::arg("ids"), py::arg("weights"), py::arg("layer"),
      py::arg("timeout_s") = 30.0,
      "The CUDA path's host side without CUDA: fill the site, submit to the worker, wait.");
  m.def("moe_site_dry_run", &set_moe_dry_run, py::arg("on"),
        "Measurement switch: host MoE jobs write zeros without computing.");
  m.def("moe_site_take_error", &take_moe_site_error,
        "The first error a host MoE job recorded since the last call ('' if none); clears it.");
}

}  // namespace ktjax
