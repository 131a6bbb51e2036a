// ktjax_stacked_matvec: y f32[M, G, N] = x f32[M, G, K] . w[layer] over K, with w the whole
// stack f32|bf16[L, G, N, K] read in place and layer an s32 scalar operand
// (cpu_kernels/matvec).
#include <exception>

#include "cpu_kernels/matvec/stacked_matvec.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/ffi_common.h"

namespace ktjax {
namespace {

namespace ffi = xla::ffi;
using namespace ffi_util;

ffi::Error stacked_matvec_ffi(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer layer,
                              ffi::Result<ffi::AnyBuffer> y) {
  KT_FFI_CHECK(expect_dtype("x", x, ffi::DataType::F32));
  KT_FFI_CHECK(expect_rank("x", x, 3));
  KT_FFI_CHECK(expect_rank("w", w, 4));
  const bool bf16 = w.element_type() == ffi::DataType::BF16;
  if (!bf16) KT_FFI_CHECK(expect_dtype("w", w, ffi::DataType::F32));
  const auto xd = x.dimensions(), wd = w.dimensions();
  KT_FFI_CHECK(expect_dim("w", w, 1, xd[1], "groups of x"));
  KT_FFI_CHECK(expect_dim("w", w, 3, xd[2], "the last dimension of x"));
  KT_FFI_CHECK(expect_s32_scalar("layer", layer));
  KT_FFI_CHECK(expect_dtype("y", *y, ffi::DataType::F32));
  KT_FFI_CHECK(expect_rank("y", *y, 3));
  const auto yd = y->dimensions();
  if (yd[0] != xd[0] || yd[1] != xd[1] || yd[2] != wd[2])
    return invalid("y", "expected shape [" + std::to_string(xd[0]) + ", " +
                            std::to_string(xd[1]) + ", " + std::to_string(wd[2]) + "], got " +
                            shape_str(yd));
  StackedMatvecProblem p;
  p.x = x.typed_data<float>();
  p.w = w.untyped_data();
  p.w_bf16 = bf16;
  p.y = y->typed_data<float>();
  p.rows = xd[0];
  p.groups = xd[1];
  p.k = xd[2];
  p.n = wd[2];
  p.layers = wd[0];
  p.layer = *layer.typed_data<int32_t>();
  try {
    stacked_matvec(p, active_isa());
  } catch (const std::exception& e) {
    return invalid("stacked_matvec", e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxStackedMatvec, stacked_matvec_ffi,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Arg<ffi::AnyBuffer>()  // layer
                                  .Ret<ffi::AnyBuffer>());  // y

}  // namespace ktjax
