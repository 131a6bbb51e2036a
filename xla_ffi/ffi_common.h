// Argument checks shared by FFI handlers. A handler must never crash on bad input: each
// check returns an InvalidArgument error naming the argument, the expectation and what
// was received; XLA raises it in Python as an XlaRuntimeError.
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ktjax::ffi_util {

namespace ffi = xla::ffi;

inline const char* dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::PRED: return "bool";
    case ffi::DataType::S8: return "int8";
    case ffi::DataType::S16: return "int16";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::S64: return "int64";
    case ffi::DataType::U8: return "uint8";
    case ffi::DataType::U16: return "uint16";
    case ffi::DataType::U32: return "uint32";
    case ffi::DataType::U64: return "uint64";
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::BF16: return "bfloat16";
    default: return "other";
  }
}

inline std::string shape_str(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

inline ffi::Error invalid(const std::string& arg, const std::string& what) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, arg + ": " + what);
}

inline ffi::Error expect_dtype(const char* arg, const ffi::AnyBuffer& b, ffi::DataType want) {
  if (b.element_type() == want) return ffi::Error::Success();
  return invalid(arg, std::string("expected dtype ") + dtype_name(want) + ", got " +
                          dtype_name(b.element_type()));
}

inline ffi::Error expect_rank(const char* arg, const ffi::AnyBuffer& b, size_t rank) {
  if (b.dimensions().size() == rank) return ffi::Error::Success();
  return invalid(arg, "expected rank " + std::to_string(rank) + ", got shape " +
                          shape_str(b.dimensions()));
}

inline ffi::Error expect_min_rank(const char* arg, const ffi::AnyBuffer& b, size_t rank) {
  if (b.dimensions().size() >= rank) return ffi::Error::Success();
  return invalid(arg, "expected rank >= " + std::to_string(rank) + ", got shape " +
                          shape_str(b.dimensions()));
}

// `axis` counts from the end when negative; the rank must already have been checked.
inline ffi::Error expect_dim(const char* arg, const ffi::AnyBuffer& b, int axis, int64_t want,
                             const std::string& meaning) {
  const auto dims = b.dimensions();
  const int64_t got = dims[axis < 0 ? dims.size() + axis : axis];
  if (got == want) return ffi::Error::Success();
  return invalid(arg, "expected dimension " + std::to_string(axis) + " = " +
                          std::to_string(want) + " (" + meaning + "), got shape " +
                          shape_str(dims));
}

inline ffi::Error expect_same_shape(const char* arg, const ffi::AnyBuffer& b,
                                    const char* other_arg, const ffi::AnyBuffer& other) {
  if (b.dimensions() == other.dimensions()) return ffi::Error::Success();
  return invalid(arg, "expected the shape of " + std::string(other_arg) + " " +
                          shape_str(other.dimensions()) + ", got " + shape_str(b.dimensions()));
}

inline ffi::Error expect_s32_scalar(const char* arg, const ffi::AnyBuffer& b) {
  if (auto e = expect_dtype(arg, b, ffi::DataType::S32); e.failure()) return e;
  if (b.element_count() == 1) return ffi::Error::Success();
  return invalid(arg, "expected a scalar, got shape " + shape_str(b.dimensions()));
}

// The handle of the current layer for "layered" targets, called inside a lax.scan over
// layers: `layer` is an s32 scalar operand indexing the `handles` attribute.
inline ffi::Error layer_handle(const ffi::AnyBuffer& layer, ffi::Span<const int64_t> handles,
                               int64_t* handle) {
  if (auto e = expect_s32_scalar("layer", layer); e.failure()) return e;
  const int64_t l = *layer.typed_data<int32_t>();
  if (l < 0 || l >= static_cast<int64_t>(handles.size()))
    return invalid("layer", "index " + std::to_string(l) + " outside the " +
                                std::to_string(handles.size()) + " handles");
  *handle = handles[l];
  return ffi::Error::Success();
}

}  // namespace ktjax::ffi_util

#define KT_FFI_CHECK(expr)                            \
  do {                                                \
    ::xla::ffi::Error kt_ffi_error_ = (expr);         \
    if (kt_ffi_error_.failure()) return kt_ffi_error_; \
  } while (0)
