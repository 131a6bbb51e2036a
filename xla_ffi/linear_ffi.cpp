// ktjax_linear_layered: y f32[..., N] = x f32[..., K] @ W^T, W a packed weight of the native
// store: one handle per layer in the attribute `handles`, the layer picked by an s32 scalar
// operand, so one call site serves every iteration of a lax.scan over layers.
#include <exception>
#include <string>

#include "cpu_kernels/linear/linear.h"
#include "cpu_kernels/store/store.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/layered_handlers.h"

namespace ktjax {
namespace {

namespace ffi = xla::ffi;
using namespace ffi_util;

ffi::Error linear_ffi(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y, int64_t handle) {
  std::shared_ptr<const StoredWeight> sw;
  try {
    sw = store_get(handle);
  } catch (const std::exception& e) {
    return invalid("handle", e.what());
  }
  if (sw->mats.size() != 1)
    return invalid("handle", "weight handle " + std::to_string(handle) +
                                 " holds an expert set, not a dense linear weight");
  const PackedWeight& w = *sw->mats[0];
  KT_FFI_CHECK(expect_dtype("x", x, ffi::DataType::F32));
  KT_FFI_CHECK(expect_dtype("y", *y, ffi::DataType::F32));
  KT_FFI_CHECK(expect_min_rank("x", x, 1));
  KT_FFI_CHECK(expect_dim("x", x, -1, w.k, "in_features of weight " + std::to_string(handle)));
  const auto xd = x.dimensions(), yd = y->dimensions();
  bool same_lead = yd.size() == xd.size();
  for (size_t i = 0; same_lead && i + 1 < xd.size(); ++i) same_lead = xd[i] == yd[i];
  if (!same_lead || yd.back() != w.n) {
    std::string want = "[";
    for (size_t i = 0; i + 1 < xd.size(); ++i) want += std::to_string(xd[i]) + ", ";
    return invalid("y", "expected shape " + want + std::to_string(w.n) +
                            "] (out_features of weight " + std::to_string(handle) + "), got " +
                            shape_str(yd));
  }
  const int64_t t = w.k == 0 ? 0 : static_cast<int64_t>(x.element_count()) / w.k;
  try {
    linear_forward(w, x.typed_data<float>(), t, y->typed_data<float>(), active_isa());
  } catch (const std::exception& e) {
    return invalid("x", e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

ffi::Error linear_layered_ffi(ffi::AnyBuffer x, ffi::AnyBuffer layer,
                              ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> handles) {
  int64_t handle = 0;
  KT_FFI_CHECK(layer_handle(layer, handles, &handle));
  return linear_ffi(x, y, handle);
}


XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxLinearLayered, linear_layered_ffi, bind_linear_layered(ffi::Ffi::Bind()));

}  // namespace ktjax
