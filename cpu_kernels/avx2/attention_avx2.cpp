// AVX2 + FMA build of the attention body.
#include "cpu_kernels/attention/attention_body.h"

namespace ktjax {

const AttentionKernels& attention_kernels_avx2() {
  static const AttentionKernels k{&attention_body::attend};
  return k;
}

}  // namespace ktjax
