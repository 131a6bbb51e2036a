#include "cpu_kernels/bindings.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {

void bind_thread_pool(pybind11::module_& m) {
  m.def("num_threads", &num_threads,
        "Threads used by native kernels (KTJAX_NUM_THREADS, else hardware concurrency).");
  // Resizing joins the workers; release the GIL so a kernel in flight can finish.
  m.def("set_num_threads", &set_num_threads, pybind11::arg("n"),
        pybind11::call_guard<pybind11::gil_scoped_release>(),
        "Sets the number of threads used by native kernels (>= 1).");
  m.def("num_nodes", &num_nodes,
        "Memory (NUMA) nodes the native kernels' threads and weights are split over.");
}

}  // namespace ktjax
