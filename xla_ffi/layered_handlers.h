// The CPU implementations of the layered host targets, shared by their CPU handlers and by
// the CUDA bridge (xla_ffi/cuda_bridge.cpp), which stages GPU operands in host memory and
// calls these.
#pragma once

#include <cstdint>

#include "xla/ffi/api/ffi.h"

namespace ktjax {

xla::ffi::Error moe_layered_ffi(xla::ffi::AnyBuffer x, xla::ffi::AnyBuffer ids,
                                xla::ffi::AnyBuffer weights, xla::ffi::AnyBuffer layer,
                                xla::ffi::Result<xla::ffi::AnyBuffer> out,
                                xla::ffi::Span<const int64_t> handles,
                                xla::ffi::Span<const int64_t> shared_handles, int32_t activation);

xla::ffi::Error linear_layered_ffi(xla::ffi::AnyBuffer x, xla::ffi::AnyBuffer layer,
                                   xla::ffi::Result<xla::ffi::AnyBuffer> y,
                                   xla::ffi::Span<const int64_t> handles);

}  // namespace ktjax
