// The host targets inside GPU programs: CUDA-platform handlers of ktjax_moe_layered and
// ktjax_linear_layered copy their operands from the GPU into host memory (on the program's
// stream), run the CPU implementation, and copy the result back. KTransformers' split: the
// GPU runs attention and the dense parts, the host CPU the routed experts next to their
// weights.
//
// The CUDA driver is reached through xla_ffi/cuda_driver.h (dlopen), so the module builds and
// imports on machines without CUDA; there the handlers fail with an error saying so. This
// bridge synchronizes the stream twice per call; the routed experts of GPU programs take the
// stream-ordered path instead (xla_ffi/moe_async_ffi.cpp).
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "xla_ffi/cuda_driver.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/layered_handlers.h"

namespace ktjax {
namespace {

namespace ffi = xla::ffi;

ffi::Error cuda_error(const char* what, int code) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("host bridge: ") + what + " failed with CUDA error " + std::to_string(code));
}

// A host copy of one GPU buffer, described by an XLA_FFI_Buffer so the CPU implementation
// reads it as an ordinary operand. Not copyable: the descriptor points into the object.
class Staged {
 public:
  Staged(const Staged&) = delete;
  Staged& operator=(const Staged&) = delete;
  explicit Staged(const ffi::AnyBuffer& gpu) : gpu_(gpu) {
    const auto dims = gpu.dimensions();
    dims_.assign(dims.begin(), dims.end());
    data_.resize(gpu.size_bytes());
    buf_.struct_size = XLA_FFI_Buffer_STRUCT_SIZE;
    buf_.extension_start = nullptr;
    buf_.dtype = static_cast<XLA_FFI_DataType>(gpu.element_type());
    buf_.data = data_.data();
    buf_.rank = static_cast<int64_t>(dims_.size());
    buf_.dims = dims_.data();
  }
  ffi::AnyBuffer host() const { return ffi::AnyBuffer(&buf_); }
  uint64_t device_ptr() const { return reinterpret_cast<uint64_t>(gpu_.untyped_data()); }
  void* data() { return data_.data(); }
  size_t bytes() const { return data_.size(); }

 private:
  ffi::AnyBuffer gpu_;
  std::vector<int64_t> dims_;
  std::vector<uint8_t> data_;
  XLA_FFI_Buffer buf_;
};

// Stages `inputs` on the host, runs `cpu(host inputs..., host result)`, copies the result back.
template <class Cpu>
ffi::Error bridge(CuStream stream, std::initializer_list<Staged*> inputs, Staged& result, Cpu cpu) {
  const CudaDriver& d = cuda_driver();
  if (!d.error.empty()) return ffi::Error(ffi::ErrorCode::kUnavailable, "host bridge: " + d.error);
  for (Staged* s : inputs)
    if (int rc = d.copy_to_host(s->data(), s->device_ptr(), s->bytes(), stream)) return cuda_error("copy to host", rc);
  if (int rc = d.synchronize(stream)) return cuda_error("stream synchronize", rc);
  ffi::Error err = cpu();
  if (err.failure()) return err;
  if (int rc = d.copy_to_device(result.device_ptr(), result.data(), result.bytes(), stream))
    return cuda_error("copy to device", rc);
  // The copy reads host memory this call owns: finish it before returning.
  if (int rc = d.synchronize(stream)) return cuda_error("stream synchronize", rc);
  return ffi::Error::Success();
}

ffi::Error moe_layered_cuda(CuStream stream, ffi::AnyBuffer x, ffi::AnyBuffer ids,
                            ffi::AnyBuffer weights, ffi::AnyBuffer layer,
                            ffi::Result<ffi::AnyBuffer> out, ffi::Span<const int64_t> handles) {
  Staged xh(x), idsh(ids), wh(weights), lh(layer), res(*out);
  return bridge(stream, {&xh, &idsh, &wh, &lh}, res, [&] {
    return moe_layered_ffi(xh.host(), idsh.host(), wh.host(), lh.host(), res.host(), handles);
  });
}

ffi::Error linear_layered_cuda(CuStream stream, ffi::AnyBuffer x, ffi::AnyBuffer layer,
                               ffi::Result<ffi::AnyBuffer> y, ffi::Span<const int64_t> handles) {
  Staged xh(x), lh(layer), res(*y);
  return bridge(stream, {&xh, &lh}, res,
                [&] { return linear_layered_ffi(xh.host(), lh.host(), res.host(), handles); });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeLayeredCuda, moe_layered_cuda,
                              bind_moe_layered(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<CuStream>>()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxLinearLayeredCuda, linear_layered_cuda,
                              bind_linear_layered(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<CuStream>>()));

}  // namespace ktjax
