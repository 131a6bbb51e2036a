// ktjax_moe: out f32[T, H] = fused MoE of x f32[T, H] routed by ids s32[T, k] with
// weights f32[T, k]; attrs: handle (expert set), shared_handle (0: none), activation
// (0 SiLU, 1 GELU-tanh).
// ktjax_moe_layered: the same with one expert set per layer, for a call inside a lax.scan
// over layers: attrs handles int64[L] (routed experts) and shared_handles int64[L] or []
// (shared experts, weight 1; empty: none); the layer is an s32 operand.
#include <exception>
#include <string>

#include "cpu_kernels/moe/moe.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/layered_handlers.h"

namespace ktjax {
namespace {

namespace ffi = xla::ffi;
using namespace ffi_util;

ffi::Error moe_ffi(ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer weights,
                   ffi::Result<ffi::AnyBuffer> out, int64_t handle, int64_t shared_handle,
                   int32_t activation) {
  KT_FFI_CHECK(expect_dtype("x", x, ffi::DataType::F32));
  KT_FFI_CHECK(expect_dtype("expert_ids", ids, ffi::DataType::S32));
  KT_FFI_CHECK(expect_dtype("expert_weights", weights, ffi::DataType::F32));
  KT_FFI_CHECK(expect_dtype("out", *out, ffi::DataType::F32));
  KT_FFI_CHECK(expect_rank("x", x, 2));
  KT_FFI_CHECK(expect_rank("expert_ids", ids, 2));
  KT_FFI_CHECK(expect_same_shape("expert_weights", weights, "expert_ids", ids));
  KT_FFI_CHECK(expect_same_shape("out", *out, "x", x));
  const int64_t t = x.dimensions()[0];
  KT_FFI_CHECK(expect_dim("expert_ids", ids, 0, t, "tokens of x"));
  if (activation != 0 && activation != 1)
    return invalid("activation", "expected 0 (silu) or 1 (gelu_tanh), got " + std::to_string(activation));
  try {
    auto sw = store_get(handle);
    const ExpertSet ex = expert_set(*sw, handle);
    KT_FFI_CHECK(expect_dim("x", x, 1, ex.hidden, "hidden size of expert set " + std::to_string(handle)));
    std::shared_ptr<const StoredWeight> ssw;
    ExpertSet shared{};
    if (shared_handle != 0) {
      ssw = store_get(shared_handle);
      shared = expert_set(*ssw, shared_handle);
    }
    const MoeArgs args{x.typed_data<float>(), ids.typed_data<int32_t>(), weights.typed_data<float>(),
                       t, ids.dimensions()[1], out->typed_data<float>()};
    moe_forward(ex, shared_handle ? &shared : nullptr, args, static_cast<Activation>(activation),
                active_isa());
  } catch (const std::exception& e) {
    return invalid("moe", e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

ffi::Error moe_layered_ffi(ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer weights,
                           ffi::AnyBuffer layer, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Span<const int64_t> handles,
                           ffi::Span<const int64_t> shared_handles, int32_t activation) {
  if (shared_handles.size() != 0 && shared_handles.size() != handles.size())
    return invalid("shared_handles", "expected " + std::to_string(handles.size()) +
                                         " handles (one per layer) or none, got " +
                                         std::to_string(shared_handles.size()));
  int64_t handle = 0, shared_handle = 0;
  KT_FFI_CHECK(layer_handle(layer, handles, &handle));
  if (shared_handles.size() != 0) KT_FFI_CHECK(layer_handle(layer, shared_handles, &shared_handle));
  return moe_ffi(x, ids, weights, out, handle, shared_handle, activation);
}


XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeLayered, moe_layered_ffi, bind_moe_layered(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoe, moe_ffi,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // expert_ids
                                  .Arg<ffi::AnyBuffer>()  // expert_weights
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<int64_t>("handle")
                                  .Attr<int64_t>("shared_handle")
                                  .Attr<int32_t>("activation"));

}  // namespace ktjax
