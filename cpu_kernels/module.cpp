#include "cpu_kernels/bindings.h"

PYBIND11_MODULE(_native, m) {
  m.doc() = "ktjax native kernels: GGUF dequantizers, host kernels, XLA FFI targets";
  ktjax::bind_thread_pool(m);
  ktjax::bind_quants(m);
  ktjax::bind_ffi_targets(m);
  ktjax::bind_linear(m);
  ktjax::bind_moe(m);
  ktjax::bind_roofline(m);
  ktjax::bind_store_io(m);
}
