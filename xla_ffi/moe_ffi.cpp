// ktjax_moe_layered: out f32[T, H] = fused MoE (routed experts: SiLU-gated, or the
// activation and biases stored with the set) of x f32[T, H] routed by ids s32[T, k] with
// weights f32[T, k], one expert set per layer for a call inside a lax.scan over layers: attr
// handles int64[L], the layer an s32 operand. Shared experts run in XLA.
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
                   ffi::Result<ffi::AnyBuffer> out, int64_t handle) {
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
  try {
    auto sw = store_get(handle);
    const ExpertSet ex = expert_set(*sw, handle);
    KT_FFI_CHECK(expect_dim("x", x, 1, ex.hidden, "hidden size of expert set " + std::to_string(handle)));
    const MoeArgs args{x.typed_data<float>(), ids.typed_data<int32_t>(), weights.typed_data<float>(),
                       t, ids.dimensions()[1], out->typed_data<float>()};
    moe_forward(ex, args, active_isa());
  } catch (const std::exception& e) {
    return invalid("moe", e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

ffi::Error moe_layered_ffi(ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer weights,
                           ffi::AnyBuffer layer, ffi::Result<ffi::AnyBuffer> out,
                           ffi::Span<const int64_t> handles) {
  int64_t handle = 0;
  KT_FFI_CHECK(layer_handle(layer, handles, &handle));
  return moe_ffi(x, ids, weights, out, handle);
}


XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeLayered, moe_layered_ffi, bind_moe_layered(ffi::Ffi::Bind()));

}  // namespace ktjax
