#include <pybind11/pybind11.h>

#include "cpu_kernels/bindings.h"
#include "xla_ffi/ffi_targets.h"

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
        return targets;
      },
      "CUDA-platform handlers of the host targets (operands staged through host memory).");
}

}  // namespace ktjax
