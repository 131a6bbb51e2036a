// ktjax_paged_attention: host paged attention over the layer's cache, read in place
// (cpu_kernels/attention). Operands: q f32[B, T, H, hd], k_new f32[B, T, n_kv, hd],
// v_new f32[B, T, n_kv, vd], k_cache / v_cache f32|bf16[L, pages, page_size, n_kv, hd|vd],
// layer s32[], block_tables s32[B, P], cache_lens s32[B], positions s32[B, T],
// sliding_window s32[] (<= 0: unlimited), sinks f32[H] (gpt-oss: a logit per head joining the
// softmax denominator) or f32[0] (none); attrs scale f32, values_in_keys int64 (MLA: the
// values are the first values_in_keys dims of the keys, v_new / v_cache are not read; 0:
// separate values). Result f32[B, T, H, vd].
#include <exception>
#include <string>

#include "cpu_kernels/attention/attention.h"
#include "xla_ffi/ffi_targets.h"
#include "xla_ffi/ffi_common.h"

namespace ktjax {
namespace {

namespace ffi = xla::ffi;
using namespace ffi_util;

ffi::Error paged_attention_ffi(ffi::AnyBuffer q, ffi::AnyBuffer k_new, ffi::AnyBuffer v_new,
                               ffi::AnyBuffer k_cache, ffi::AnyBuffer v_cache,
                               ffi::AnyBuffer layer, ffi::AnyBuffer block_tables,
                               ffi::AnyBuffer cache_lens, ffi::AnyBuffer positions,
                               ffi::AnyBuffer sliding_window, ffi::AnyBuffer sinks,
                               ffi::Result<ffi::AnyBuffer> out,
                               float scale, int64_t values_in_keys) {
  for (auto [name, buf] : {std::pair<const char*, const ffi::AnyBuffer*>{"q", &q},
                           {"k_new", &k_new}, {"v_new", &v_new}})
    KT_FFI_CHECK(expect_dtype(name, *buf, ffi::DataType::F32));
  KT_FFI_CHECK(expect_rank("q", q, 4));
  KT_FFI_CHECK(expect_rank("k_new", k_new, 4));
  KT_FFI_CHECK(expect_rank("k_cache", k_cache, 5));
  const auto qd = q.dimensions(), kd = k_cache.dimensions();
  const int64_t batch = qd[0], tokens = qd[1], heads = qd[2], hd = qd[3], kv = kd[3];
  KT_FFI_CHECK(expect_dim("k_new", k_new, 0, batch, "rows of q"));
  KT_FFI_CHECK(expect_dim("k_new", k_new, 1, tokens, "tokens of q"));
  KT_FFI_CHECK(expect_dim("k_new", k_new, 2, kv, "KV heads of k_cache"));
  KT_FFI_CHECK(expect_dim("k_new", k_new, 3, hd, "head dim of q"));
  KT_FFI_CHECK(expect_dim("k_cache", k_cache, 4, hd, "head dim of q"));
  const bool bf16 = k_cache.element_type() == ffi::DataType::BF16;
  if (!bf16) KT_FFI_CHECK(expect_dtype("k_cache", k_cache, ffi::DataType::F32));
  int64_t vd = values_in_keys;
  if (values_in_keys < 0 || values_in_keys > hd)
    return invalid("values_in_keys", "expected 0..head dim " + std::to_string(hd) + ", got " +
                                         std::to_string(values_in_keys));
  if (values_in_keys == 0) {
    KT_FFI_CHECK(expect_rank("v_new", v_new, 4));
    KT_FFI_CHECK(expect_rank("v_cache", v_cache, 5));
    vd = v_cache.dimensions()[4];
    KT_FFI_CHECK(expect_dtype("v_cache", v_cache, k_cache.element_type()));
    for (int axis = 0; axis < 4; ++axis)
      KT_FFI_CHECK(expect_dim("v_cache", v_cache, axis, kd[axis], "as k_cache"));
    for (int axis = 0; axis < 3; ++axis)
      KT_FFI_CHECK(expect_dim("v_new", v_new, axis, k_new.dimensions()[axis], "as k_new"));
    KT_FFI_CHECK(expect_dim("v_new", v_new, 3, vd, "value dim of v_cache"));
  }
  KT_FFI_CHECK(expect_s32_scalar("layer", layer));
  KT_FFI_CHECK(expect_s32_scalar("sliding_window", sliding_window));
  KT_FFI_CHECK(expect_dtype("sinks", sinks, ffi::DataType::F32));
  KT_FFI_CHECK(expect_rank("sinks", sinks, 1));
  const bool has_sinks = sinks.dimensions()[0] != 0;
  if (has_sinks) KT_FFI_CHECK(expect_dim("sinks", sinks, 0, heads, "query heads of q (or 0: none)"));
  for (auto [name, buf] : {std::pair<const char*, const ffi::AnyBuffer*>{"block_tables", &block_tables},
                           {"cache_lens", &cache_lens}, {"positions", &positions}})
    KT_FFI_CHECK(expect_dtype(name, *buf, ffi::DataType::S32));
  KT_FFI_CHECK(expect_rank("block_tables", block_tables, 2));
  KT_FFI_CHECK(expect_dim("block_tables", block_tables, 0, batch, "rows of q"));
  KT_FFI_CHECK(expect_rank("cache_lens", cache_lens, 1));
  KT_FFI_CHECK(expect_dim("cache_lens", cache_lens, 0, batch, "rows of q"));
  KT_FFI_CHECK(expect_rank("positions", positions, 2));
  KT_FFI_CHECK(expect_dim("positions", positions, 0, batch, "rows of q"));
  KT_FFI_CHECK(expect_dim("positions", positions, 1, tokens, "tokens of q"));
  KT_FFI_CHECK(expect_dtype("out", *out, ffi::DataType::F32));
  KT_FFI_CHECK(expect_rank("out", *out, 4));
  const auto od = out->dimensions();
  if (od[0] != batch || od[1] != tokens || od[2] != heads || od[3] != vd)
    return invalid("out", "expected shape [" + std::to_string(batch) + ", " +
                              std::to_string(tokens) + ", " + std::to_string(heads) + ", " +
                              std::to_string(vd) + "], got " + shape_str(od));

  AttentionProblem p;
  p.q = q.typed_data<float>();
  p.k_new = k_new.typed_data<float>();
  p.v_new = values_in_keys ? nullptr : v_new.typed_data<float>();
  p.k_cache = k_cache.untyped_data();
  p.v_cache = values_in_keys ? nullptr : v_cache.untyped_data();
  p.cache_type = bf16 ? CacheType::BF16 : CacheType::F32;
  p.block_tables = block_tables.typed_data<int32_t>();
  p.cache_lens = cache_lens.typed_data<int32_t>();
  p.positions = positions.typed_data<int32_t>();
  p.out = out->typed_data<float>();
  p.batch = batch;
  p.tokens = tokens;
  p.heads = heads;
  p.kv_heads = kv;
  p.head_dim = hd;
  p.value_dim = vd;
  p.layer = *layer.typed_data<int32_t>();
  p.layers = kd[0];
  p.pages = kd[1];
  p.page_size = kd[2];
  p.table_pages = block_tables.dimensions()[1];
  p.values_in_keys = values_in_keys > 0;
  p.scale = scale;
  p.sliding_window = *sliding_window.typed_data<int32_t>();
  p.sinks = has_sinks ? sinks.typed_data<float>() : nullptr;
  try {
    paged_attention(p, active_isa());
  } catch (const std::exception& e) {
    return invalid("paged_attention", e.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KtjaxPagedAttention, paged_attention_ffi,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // q
                                  .Arg<ffi::AnyBuffer>()  // k_new
                                  .Arg<ffi::AnyBuffer>()  // v_new
                                  .Arg<ffi::AnyBuffer>()  // k_cache
                                  .Arg<ffi::AnyBuffer>()  // v_cache
                                  .Arg<ffi::AnyBuffer>()  // layer
                                  .Arg<ffi::AnyBuffer>()  // block_tables
                                  .Arg<ffi::AnyBuffer>()  // cache_lens
                                  .Arg<ffi::AnyBuffer>()  // positions
                                  .Arg<ffi::AnyBuffer>()  // sliding_window
                                  .Arg<ffi::AnyBuffer>()  // sinks
                                  .Ret<ffi::AnyBuffer>()  // out
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("values_in_keys"));

}  // namespace ktjax
