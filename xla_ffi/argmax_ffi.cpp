// ktjax_argmax: ids s32[B] = first index of each row's maximum of x f32[B, V] (NaN counts as
// the maximum, as jnp.argmax) (cpu_kernels/reduce).
#include "cpu_kernels/reduce/argmax.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/ffi_targets.h"

namespace ktjax {
namespace {

namespace ffi = xla::ffi;
using namespace ffi_util;

ffi::Error argmax_ffi(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> ids) {
  KT_FFI_CHECK(expect_dtype("x", x, ffi::DataType::F32));
  KT_FFI_CHECK(expect_rank("x", x, 2));
  KT_FFI_CHECK(expect_dtype("ids", *ids, ffi::DataType::S32));
  KT_FFI_CHECK(expect_rank("ids", *ids, 1));
  const auto d = x.dimensions();
  KT_FFI_CHECK(expect_dim("ids", *ids, 0, d[0], "rows of x"));
  if (d[1] < 1) return invalid("x", "expected at least one column, got shape " + shape_str(d));
  argmax_rows(x.typed_data<float>(), d[0], d[1], ids->typed_data<int32_t>(), active_isa());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxArgmax, argmax_ffi,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()   // x
                                  .Ret<ffi::AnyBuffer>());  // ids

}  // namespace ktjax
