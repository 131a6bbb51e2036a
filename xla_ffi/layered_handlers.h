// The CPU implementations of the layered host targets, shared by their CPU handlers and by
// the CUDA bridge (xla_ffi/cuda_bridge.cpp), which stages GPU operands in host memory and
// calls these; and each target's operands and attributes, bound once for both platforms.
#pragma once

#include <cstdint>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace ktjax {

xla::ffi::Error moe_layered_ffi(xla::ffi::AnyBuffer x, xla::ffi::AnyBuffer ids,
                                xla::ffi::AnyBuffer weights, xla::ffi::AnyBuffer layer,
                                xla::ffi::Result<xla::ffi::AnyBuffer> out,
                                xla::ffi::Span<const int64_t> handles);

xla::ffi::Error linear_layered_ffi(xla::ffi::AnyBuffer x, xla::ffi::AnyBuffer layer,
                                   xla::ffi::Result<xla::ffi::AnyBuffer> y,
                                   xla::ffi::Span<const int64_t> handles);

// b (Ffi::Bind(), or with the CUDA stream context first) followed by the target's operands.
template <class Binding>
auto bind_moe_layered(Binding b) {
  return std::move(b)
      .template Arg<xla::ffi::AnyBuffer>()  // x
      .template Arg<xla::ffi::AnyBuffer>()  // expert_ids
      .template Arg<xla::ffi::AnyBuffer>()  // expert_weights
      .template Arg<xla::ffi::AnyBuffer>()  // layer: s32 scalar
      .template Ret<xla::ffi::AnyBuffer>()  // out
      .template Attr<xla::ffi::Span<const int64_t>>("handles");
}

template <class Binding>
auto bind_linear_layered(Binding b) {
  return std::move(b)
      .template Arg<xla::ffi::AnyBuffer>()  // x
      .template Arg<xla::ffi::AnyBuffer>()  // layer: s32 scalar
      .template Ret<xla::ffi::AnyBuffer>()  // y
      .template Attr<xla::ffi::Span<const int64_t>>("handles");
}

}  // namespace ktjax
