// One bind_* function per component; module.cpp calls each once.
#pragma once

#include <pybind11/pybind11.h>

namespace ktjax {

void bind_thread_pool(pybind11::module_& m);  // cpu_kernels/bind_thread_pool.cpp
void bind_quants(pybind11::module_& m);       // cpu_kernels/quants/bind_quants.cpp
void bind_ffi_targets(pybind11::module_& m);  // xla_ffi/bind_ffi_targets.cpp
void bind_linear(pybind11::module_& m);       // cpu_kernels/linear/bind_linear.cpp
void bind_moe(pybind11::module_& m);          // cpu_kernels/moe/bind_moe.cpp
void bind_roofline(pybind11::module_& m);     // cpu_kernels/roofline/bind_roofline.cpp
void bind_store_io(pybind11::module_& m);     // cpu_kernels/store/bind_store_io.cpp

}  // namespace ktjax
