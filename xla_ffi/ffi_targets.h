// FFI handlers exported by this module; bind_ffi_targets.cpp lists them for Python.
#pragma once

#include "xla/ffi/api/c_api.h"

namespace ktjax {

// ktjax_rms_norm_f32: x f32[..., H], w f32[H], attr eps: f32 -> f32 like x
// (xla_ffi/rms_norm_ffi.cpp).
extern "C" XLA_FFI_Error* KtjaxRmsNormF32(XLA_FFI_CallFrame* call_frame);
// ktjax_linear_layered: x f32[..., K], layer s32[], attr handles: int64[L] -> f32[..., N]
// (xla_ffi/linear_ffi.cpp).
extern "C" XLA_FFI_Error* KtjaxLinearLayered(XLA_FFI_CallFrame* call_frame);
// ktjax_moe_layered: x f32[T, H], ids s32[T, k], weights f32[T, k], layer s32[], attr
// handles: int64[L] -> f32[T, H] (xla_ffi/moe_ffi.cpp).
extern "C" XLA_FFI_Error* KtjaxMoeLayered(XLA_FFI_CallFrame* call_frame);
// ktjax_paged_attention: host paged attention (xla_ffi/attention_ffi.cpp lists operands).
extern "C" XLA_FFI_Error* KtjaxPagedAttention(XLA_FFI_CallFrame* call_frame);
// ktjax_stacked_matvec: x f32[M, G, K], w f32|bf16[L, G, N, K], layer s32[] -> f32[M, G, N].
extern "C" XLA_FFI_Error* KtjaxStackedMatvec(XLA_FFI_CallFrame* call_frame);
// ktjax_argmax: x f32[B, V] -> s32[B], first index of each row's maximum.
extern "C" XLA_FFI_Error* KtjaxArgmax(XLA_FFI_CallFrame* call_frame);

// ktjax_moe_submit: x f32[T, H], ids s32[T, k] (-1: skip), weights f32[T, k], layer s32[],
// after, attr site -> token u8[1]; ktjax_moe_wait: token, after, attr site -> f32[T, H]
// (xla_ffi/moe_async_ffi.cpp), for CPU and, stream-ordered, for CUDA programs.
// ktjax_moe_after: x, token -> x (aliased; orders x's readers after a submit), CPU and CUDA.
extern "C" XLA_FFI_Error* KtjaxMoeAfter(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* KtjaxMoeSubmit(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* KtjaxMoeWait(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* KtjaxMoeSubmitCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* KtjaxMoeWaitCuda(XLA_FFI_CallFrame* call_frame);

// CUDA-platform handlers of the layered host targets (xla_ffi/cuda_bridge.cpp): operands staged
// through host memory.
extern "C" XLA_FFI_Error* KtjaxMoeLayeredCuda(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* KtjaxLinearLayeredCuda(XLA_FFI_CallFrame* call_frame);

}  // namespace ktjax
