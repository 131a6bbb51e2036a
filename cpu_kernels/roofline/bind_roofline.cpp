// Python bindings of the machine's measured ceilings (benchmarks).
#include <pybind11/pybind11.h>

#include "cpu_kernels/bindings.h"
#include "cpu_kernels/roofline/roofline.h"

namespace py = pybind11;

namespace ktjax {

void bind_roofline(py::module_& m) {
  m.def("read_bandwidth_gbps", &read_bandwidth_gbps, py::arg("bytes") = 0, py::arg("reps") = 5,
        py::call_guard<py::gil_scoped_release>(),
        "Read bandwidth of all pool threads, GB/s (bytes 0: 1 GiB and 8x the last-level cache at least).");
  m.def("amx_tile_peak_tops", &amx_tile_peak_tops, py::arg("products") = 1 << 20, py::arg("reps") = 3,
        py::call_guard<py::gil_scoped_release>(),
        "AMX int8 TOPS of all pool threads issuing tile products with no loads (RuntimeError without AMX).");
}

}  // namespace ktjax
