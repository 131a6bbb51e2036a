// AVX-512 build of the attention body (also used on AMX machines).
#include "cpu_kernels/attention/attention_body.h"

namespace ktjax {

const AttentionKernels& attention_kernels_avx512() {
  static const AttentionKernels k{&attention_body::attend};
  return k;
}

}  // namespace ktjax
