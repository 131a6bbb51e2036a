// The CUDA driver entry points the GPU-side handlers use, reached through dlopen/dlsym of
// libcuda.so.1 (loaded already wherever a CUDA jaxlib runs), so the module builds without a
// CUDA SDK and imports on machines without CUDA; there `error` says why and the handlers fail
// with it. CUresult is an int enum (0 = success); CUstream and CUcontext are opaque pointers.
#pragma once

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

struct CUstream_st;
struct CUctx_st;

namespace ktjax {

using CuStream = CUstream_st*;
using CuContext = CUctx_st*;
using CuHostFn = void (*)(void* user_data);

struct CudaDriver {
  int (*init)(unsigned flags) = nullptr;
  int (*device_get)(int* device, int ordinal) = nullptr;
  int (*primary_ctx_retain)(CuContext* ctx, int device) = nullptr;
  int (*ctx_get_current)(CuContext* ctx) = nullptr;
  int (*ctx_push)(CuContext ctx) = nullptr;
  int (*ctx_pop)(CuContext* ctx) = nullptr;
  int (*host_alloc)(void** p, size_t bytes, unsigned flags) = nullptr;
  int (*copy_to_host)(void* dst, uint64_t src, size_t bytes, CuStream stream) = nullptr;
  int (*copy_to_device)(uint64_t dst, const void* src, size_t bytes, CuStream stream) = nullptr;
  int (*launch_host_func)(CuStream stream, CuHostFn fn, void* user_data) = nullptr;
  int (*synchronize)(CuStream stream) = nullptr;
  std::string error;  // empty when every entry point above was found
};

constexpr unsigned kCuMemHostAllocPortable = 0x01;  // CU_MEMHOSTALLOC_PORTABLE: all contexts

inline const CudaDriver& cuda_driver() {
  static const CudaDriver d = [] {
    CudaDriver d;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      const char* why = dlerror();
      d.error = std::string("cannot load the CUDA driver (libcuda.so.1): ") + (why ? why : "unknown");
      return d;
    }
    std::string missing;
    auto get = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(lib, name));
      if (fn == nullptr) missing += std::string(missing.empty() ? "" : ", ") + name;
    };
    get(d.init, "cuInit");
    get(d.device_get, "cuDeviceGet");
    get(d.primary_ctx_retain, "cuDevicePrimaryCtxRetain");
    get(d.ctx_get_current, "cuCtxGetCurrent");
    get(d.ctx_push, "cuCtxPushCurrent_v2");
    get(d.ctx_pop, "cuCtxPopCurrent_v2");
    get(d.host_alloc, "cuMemHostAlloc");
    get(d.copy_to_host, "cuMemcpyDtoHAsync_v2");
    get(d.copy_to_device, "cuMemcpyHtoDAsync_v2");
    get(d.launch_host_func, "cuLaunchHostFunc");
    get(d.synchronize, "cuStreamSynchronize");
    if (!missing.empty()) d.error = "the CUDA driver lacks " + missing;
    return d;
  }();
  return d;
}

}  // namespace ktjax
