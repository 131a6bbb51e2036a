#include <pybind11/numpy.h>

#include <string>

#include "cpu_kernels/bindings.h"
#include "cpu_kernels/quants/dequant.h"
#include "cpu_kernels/quants/ggml_types.h"

namespace py = pybind11;

namespace ktjax {
namespace {

py::array dequantize(const py::array& raw, int type, int64_t n_elements,
                     const std::string& out_dtype) {
  if (!raw.dtype().is(py::dtype::of<uint8_t>()) || !(raw.flags() & py::array::c_style)) {
    throw py::type_error("raw must be a C-contiguous uint8 array, got dtype " +
                         py::str(raw.dtype()).cast<std::string>());
  }
  const QuantFormat* f = find_quant_format(type);
  if (f == nullptr) {
    throw py::value_error("quant type " + ggml_type_label(type) + " is not supported");
  }
  const std::string name = ggml_type_label(type);
  if (n_elements < 0 || n_elements % f->block_size != 0) {
    throw py::value_error("n_elements " + std::to_string(n_elements) + " is not a multiple of the " +
                          name + " block size " + std::to_string(f->block_size));
  }
  const int64_t n_blocks = n_elements / f->block_size;
  int64_t expected = 0;
  if (__builtin_mul_overflow(n_blocks, f->type_size, &expected))
    throw py::value_error(name + " data for " + std::to_string(n_elements) +
                          " elements would exceed 2^63 bytes");
  if (raw.nbytes() != expected) {
    throw py::value_error(name + " data for " + std::to_string(n_elements) + " elements must be " +
                          std::to_string(expected) + " bytes, got " +
                          std::to_string(raw.nbytes()));
  }
  const auto* src = static_cast<const uint8_t*>(raw.data());
  if (out_dtype == "float32") {
    py::array_t<float> out(n_elements);
    float* dst = out.mutable_data();
    py::gil_scoped_release release;
    dequantize_f32(type, src, n_blocks, dst);
    return std::move(out);
  }
  if (out_dtype == "bfloat16") {
    py::object bf16 = py::module_::import("ml_dtypes").attr("bfloat16");
    py::array_t<uint16_t> out(n_elements);
    uint16_t* dst = out.mutable_data();
    {
      py::gil_scoped_release release;
      dequantize_bf16(type, src, n_blocks, dst);
    }
    return out.attr("view")(bf16);
  }
  throw py::value_error("out_dtype must be 'float32' or 'bfloat16', got '" + out_dtype + "'");
}

}  // namespace

void bind_quants(py::module_& m) {
  m.def("dequantize", &dequantize, py::arg("raw"), py::arg("ggml_type"), py::arg("n_elements"),
        py::arg("out_dtype") = "float32",
        "Dequantizes GGUF tensor bytes to a 1-D float32 or bfloat16 array (bit-exact with "
        "gguf.quants.dequantize).");
}

}  // namespace ktjax
