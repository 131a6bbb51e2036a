// ktjax_moe_submit / ktjax_moe_wait: the routed experts on the host as work in the program's
// order, split so the device computes what lies between (the shared experts) while the host
// computes the routed ones.
//
//   token u8[1] = ktjax_moe_submit(x f32[T, H], ids s32[T, k], weights f32[T, k], layer s32[],
//                                  after; attr site)      `after`: as the wait's (a deferred
//                                                          job reusing a site: its last wait)
//   out f32[T, H] = ktjax_moe_wait(token, after; attr site)      `after`: any operand the wait
//                                                                  is ordered after
//
// `site` names the buffers reserved for this traced call (xla_ffi/moe_site.h). CUDA: submit
// enqueues on the program's stream the copies of x, ids, weights and layer into the site's
// pinned buffers and a host function handing the job to the host MoE worker; wait enqueues a
// host function waiting for the job, then the copy of the result back. No synchronization and
// no allocation: the handlers are command-buffer compatible, and XLA captures them into the
// step's CUDA graph (they run at capture time only; everything per step happens in the
// enqueued work). CPU: submit runs the job at once, wait copies its result.
// A job's failure leaves zeros in `out` and an error for take_moe_site_error().
#include <cstring>
#include <string>

#include "xla_ffi/cuda_driver.h"
#include "xla_ffi/ffi_common.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/moe_site.h"

namespace ktjax {
namespace {

namespace ffi = xla::ffi;
using namespace ffi_util;

ffi::Error site_of(int64_t id, MoeSite** site) {
  *site = find_moe_site(id);
  if (*site == nullptr)
    return invalid("site", "no host MoE site " + std::to_string(id) + " was reserved (moe_site_reserve)");
  return ffi::Error::Success();
}

ffi::Error check_submit(const MoeSite& s, const ffi::AnyBuffer& x, const ffi::AnyBuffer& ids,
                        const ffi::AnyBuffer& weights, const ffi::AnyBuffer& layer) {
  KT_FFI_CHECK(expect_dtype("x", x, ffi::DataType::F32));
  KT_FFI_CHECK(expect_dtype("expert_ids", ids, ffi::DataType::S32));
  KT_FFI_CHECK(expect_dtype("expert_weights", weights, ffi::DataType::F32));
  KT_FFI_CHECK(expect_rank("x", x, 2));
  KT_FFI_CHECK(expect_rank("expert_ids", ids, 2));
  KT_FFI_CHECK(expect_same_shape("expert_weights", weights, "expert_ids", ids));
  const std::string site = "of site " + std::to_string(s.id);
  KT_FFI_CHECK(expect_dim("x", x, 0, s.tokens, "tokens " + site));
  KT_FFI_CHECK(expect_dim("x", x, 1, s.hidden, "hidden size " + site));
  KT_FFI_CHECK(expect_dim("expert_ids", ids, 0, s.tokens, "tokens " + site));
  KT_FFI_CHECK(expect_dim("expert_ids", ids, 1, s.top_k, "experts per token " + site));
  KT_FFI_CHECK(expect_s32_scalar("layer", layer));
  return ffi::Error::Success();
}

ffi::Error check_wait(const MoeSite& s, const ffi::AnyBuffer& out) {
  KT_FFI_CHECK(expect_dtype("out", out, ffi::DataType::F32));
  KT_FFI_CHECK(expect_rank("out", out, 2));
  KT_FFI_CHECK(expect_dim("out", out, 0, s.tokens, "tokens of site " + std::to_string(s.id)));
  KT_FFI_CHECK(expect_dim("out", out, 1, s.hidden, "hidden size of site " + std::to_string(s.id)));
  return ffi::Error::Success();
}

// ---- CPU --------------------------------------------------------------------------------

ffi::Error submit_cpu(ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer weights, ffi::AnyBuffer layer,
                      ffi::AnyBuffer /*after*/, ffi::Result<ffi::AnyBuffer> /*token*/, int64_t site_id) {
  MoeSite* s = nullptr;
  KT_FFI_CHECK(site_of(site_id, &s));
  KT_FFI_CHECK(check_submit(*s, x, ids, weights, layer));
  std::memcpy(s->x, x.untyped_data(), s->x_bytes());
  std::memcpy(s->ids, ids.untyped_data(), s->route_bytes());
  std::memcpy(s->weights, weights.untyped_data(), s->route_bytes());
  std::memcpy(s->layer, layer.untyped_data(), 4);
  s->run();
  return ffi::Error::Success();
}

ffi::Error wait_cpu(ffi::AnyBuffer /*token*/, ffi::AnyBuffer /*after*/, ffi::Result<ffi::AnyBuffer> out,
                    int64_t site_id) {
  MoeSite* s = nullptr;
  KT_FFI_CHECK(site_of(site_id, &s));
  KT_FFI_CHECK(check_wait(*s, *out));
  std::memcpy(out->untyped_data(), s->out, s->x_bytes());
  return ffi::Error::Success();
}

// ktjax_moe_after(x, token) -> x, the output aliased to x: x's readers (the device's part of
// the layer) depend on the submit's token as data, so XLA schedules them after the submit; an
// optimization barrier does not (XLA removes barriers before it schedules). Nothing to do on
// either platform: the output is x's buffer, which XLA guarantees for an aliased output.
ffi::Error after_noop(ffi::AnyBuffer x, ffi::AnyBuffer /*token*/, ffi::Result<ffi::AnyBuffer> out) {
  if (out->untyped_data() != x.untyped_data())
    return ffi::Error(ffi::ErrorCode::kInternal, "ktjax_moe_after: the output is not aliased to x");
  return ffi::Error::Success();
}

// ---- CUDA -------------------------------------------------------------------------------

ffi::Error cuda_ready(const MoeSite& s) {
  const CudaDriver& d = cuda_driver();
  if (!d.error.empty()) return ffi::Error(ffi::ErrorCode::kUnavailable, "host MoE: " + d.error);
  if (!s.pinned)
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "host MoE site " + std::to_string(s.id) +
                          " has no pinned buffers (reserved without a usable CUDA driver)");
  return ffi::Error::Success();
}

ffi::Error cuda_failed(const char* what, int code) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("host MoE: ") + what + " failed with CUDA error " + std::to_string(code));
}

void submit_host_fn(void* site) { submit_moe_job(static_cast<MoeSite*>(site)); }
void wait_host_fn(void* site) { wait_moe_job(static_cast<MoeSite*>(site)); }

uint64_t dptr(const ffi::AnyBuffer& b) { return reinterpret_cast<uint64_t>(b.untyped_data()); }

ffi::Error submit_cuda(CuStream stream, ffi::AnyBuffer x, ffi::AnyBuffer ids, ffi::AnyBuffer weights,
                       ffi::AnyBuffer layer, ffi::AnyBuffer /*after*/, ffi::Result<ffi::AnyBuffer> /*token*/,
                       int64_t site_id) {
  MoeSite* s = nullptr;
  KT_FFI_CHECK(site_of(site_id, &s));
  KT_FFI_CHECK(check_submit(*s, x, ids, weights, layer));
  KT_FFI_CHECK(cuda_ready(*s));
  const CudaDriver& d = cuda_driver();
  if (int rc = d.copy_to_host(s->x, dptr(x), s->x_bytes(), stream)) return cuda_failed("copy of x", rc);
  if (int rc = d.copy_to_host(s->ids, dptr(ids), s->route_bytes(), stream)) return cuda_failed("copy of ids", rc);
  if (int rc = d.copy_to_host(s->weights, dptr(weights), s->route_bytes(), stream))
    return cuda_failed("copy of weights", rc);
  if (int rc = d.copy_to_host(s->layer, dptr(layer), 4, stream)) return cuda_failed("copy of layer", rc);
  if (int rc = d.launch_host_func(stream, submit_host_fn, s)) return cuda_failed("host function launch", rc);
  return ffi::Error::Success();
}

ffi::Error wait_cuda(CuStream stream, ffi::AnyBuffer /*token*/, ffi::AnyBuffer /*after*/,
                     ffi::Result<ffi::AnyBuffer> out, int64_t site_id) {
  MoeSite* s = nullptr;
  KT_FFI_CHECK(site_of(site_id, &s));
  KT_FFI_CHECK(check_wait(*s, *out));
  KT_FFI_CHECK(cuda_ready(*s));
  const CudaDriver& d = cuda_driver();
  if (int rc = d.launch_host_func(stream, wait_host_fn, s)) return cuda_failed("host function launch", rc);
  if (int rc = d.copy_to_device(dptr(*out), s->out, s->x_bytes(), stream)) return cuda_failed("copy of out", rc);
  return ffi::Error::Success();
}

template <class B>
auto bind_submit(B b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // x
      .template Arg<ffi::AnyBuffer>()  // expert_ids
      .template Arg<ffi::AnyBuffer>()  // expert_weights
      .template Arg<ffi::AnyBuffer>()  // layer
      .template Arg<ffi::AnyBuffer>()  // after (ordering only)
      .template Ret<ffi::AnyBuffer>()  // token
      .template Attr<int64_t>("site");
}

template <class B>
auto bind_wait(B b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()  // token
      .template Arg<ffi::AnyBuffer>()  // after
      .template Ret<ffi::AnyBuffer>()  // out
      .template Attr<int64_t>("site");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeAfter, after_noop,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>(),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeSubmit, submit_cpu, bind_submit(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeWait, wait_cpu, bind_wait(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeSubmitCuda, submit_cuda,
                              bind_submit(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<CuStream>>()),
                              {ffi::Traits::kCmdBufferCompatible});
XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxMoeWaitCuda, wait_cuda,
                              bind_wait(ffi::Ffi::Bind().Ctx<ffi::PlatformStream<CuStream>>()),
                              {ffi::Traits::kCmdBufferCompatible});

}  // namespace ktjax
