// Baseline x86-64 (SSE2) build of the attention body; also the fallback on any CPU.
#include "cpu_kernels/attention/attention_body.h"

namespace ktjax {

const AttentionKernels& attention_kernels_generic() {
  static const AttentionKernels k{&attention_body::attend};
  return k;
}

}  // namespace ktjax
