// RMSNorm on the host: out = x / sqrt(mean(x^2) + eps) * w over the last axis, for CPU
// programs: each row is summed in order, so a row's result does not depend on the other
// rows or the thread count (ktjax/kernels/rms_norm.py).
#include <cmath>

#include "cpu_kernels/thread_pool.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/ffi_common.h"

namespace ktjax {
namespace {

namespace ffi = xla::ffi;
using namespace ffi_util;

ffi::Error rms_norm_f32(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> out,
                        float eps) {
  KT_FFI_CHECK(expect_dtype("x", x, ffi::DataType::F32));
  KT_FFI_CHECK(expect_dtype("w", w, ffi::DataType::F32));
  KT_FFI_CHECK(expect_dtype("out", *out, ffi::DataType::F32));
  KT_FFI_CHECK(expect_min_rank("x", x, 1));
  KT_FFI_CHECK(expect_rank("w", w, 1));
  const int64_t hidden = x.dimensions().back();
  KT_FFI_CHECK(expect_dim("w", w, 0, hidden, "the last dimension of x"));
  KT_FFI_CHECK(expect_same_shape("out", *out, "x", x));
  if (!(eps >= 0.0f)) return invalid("eps", "expected a non-negative number, got " + std::to_string(eps));

  const float* xs = x.typed_data<float>();
  const float* ws = w.typed_data<float>();
  float* ys = out->typed_data<float>();
  const int64_t rows = hidden == 0 ? 0 : static_cast<int64_t>(x.element_count()) / hidden;
  auto run = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = xs + r * hidden;
      float* yr = ys + r * hidden;
      float ss = 0.0f;
      for (int64_t i = 0; i < hidden; ++i) ss += xr[i] * xr[i];
      const float scale = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + eps);
      for (int64_t i = 0; i < hidden; ++i) yr[i] = xr[i] * scale * ws[i];
    }
  };
  if (rows * hidden < (int64_t{1} << 15)) {
    run(0, rows);
  } else {
    parallel_for(rows, run);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxRmsNormF32, rms_norm_f32,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // w
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<float>("eps"));

}  // namespace ktjax
