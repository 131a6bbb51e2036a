#include "cpu_kernels/quants/ggml_types.h"

namespace ktjax {

const char* ggml_type_name(int type) {
  switch (static_cast<GgmlType>(type)) {
    case GgmlType::F32: return "F32";
    case GgmlType::F16: return "F16";
    case GgmlType::Q4_0: return "Q4_0";
    case GgmlType::Q4_1: return "Q4_1";
    case GgmlType::Q5_0: return "Q5_0";
    case GgmlType::Q5_1: return "Q5_1";
    case GgmlType::Q8_0: return "Q8_0";
    case GgmlType::Q8_1: return "Q8_1";
    case GgmlType::Q2_K: return "Q2_K";
    case GgmlType::Q3_K: return "Q3_K";
    case GgmlType::Q4_K: return "Q4_K";
    case GgmlType::Q5_K: return "Q5_K";
    case GgmlType::Q6_K: return "Q6_K";
    case GgmlType::Q8_K: return "Q8_K";
    case GgmlType::IQ2_XXS: return "IQ2_XXS";
    case GgmlType::IQ2_XS: return "IQ2_XS";
    case GgmlType::IQ3_XXS: return "IQ3_XXS";
    case GgmlType::IQ1_S: return "IQ1_S";
    case GgmlType::IQ4_NL: return "IQ4_NL";
    case GgmlType::IQ3_S: return "IQ3_S";
    case GgmlType::IQ2_S: return "IQ2_S";
    case GgmlType::IQ4_XS: return "IQ4_XS";
    case GgmlType::I8: return "I8";
    case GgmlType::I16: return "I16";
    case GgmlType::I32: return "I32";
    case GgmlType::I64: return "I64";
    case GgmlType::F64: return "F64";
    case GgmlType::IQ1_M: return "IQ1_M";
    case GgmlType::BF16: return "BF16";
    case GgmlType::TQ1_0: return "TQ1_0";
    case GgmlType::TQ2_0: return "TQ2_0";
    case GgmlType::MXFP4: return "MXFP4";
  }
  return nullptr;
}

std::string ggml_type_label(int type) {
  const char* name = ggml_type_name(type);
  return name ? std::string(name) : "with id " + std::to_string(type);
}

}  // namespace ktjax
