// One bind_* function per component; module.cpp calls each once.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

namespace ktjax {

struct ExpertEpilogue;
// An expert set's epilogue from its Python description (None: none; else a dict with
// activation "silu" | "swiglu_oai", alpha, limit, and gate_bias / up_bias / down_bias: None or
// a float32 [experts, rows] array). Throws std::invalid_argument naming the bad field; shapes
// against the set are checked where it is attached (check_epilogue). cpu_kernels/moe/bind_moe.cpp
std::shared_ptr<const ExpertEpilogue> epilogue_from_py(const pybind11::object& spec);

void bind_thread_pool(pybind11::module_& m);  // cpu_kernels/bind_thread_pool.cpp
void bind_quants(pybind11::module_& m);       // cpu_kernels/quants/bind_quants.cpp
void bind_ffi_targets(pybind11::module_& m);  // xla_ffi/bind_ffi_targets.cpp
void bind_linear(pybind11::module_& m);       // cpu_kernels/linear/bind_linear.cpp
void bind_moe(pybind11::module_& m);          // cpu_kernels/moe/bind_moe.cpp
void bind_roofline(pybind11::module_& m);     // cpu_kernels/roofline/bind_roofline.cpp
void bind_store_io(pybind11::module_& m);     // cpu_kernels/store/bind_store_io.cpp

}  // namespace ktjax
