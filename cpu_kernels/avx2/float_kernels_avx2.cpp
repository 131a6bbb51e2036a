// AVX2 + FMA build of the float kernels.
#include "cpu_kernels/attention/attention_body.h"
#include "cpu_kernels/float_kernels.h"
#include "cpu_kernels/matvec/matvec_body.h"
#include "cpu_kernels/moe/activation_body.h"
#include "cpu_kernels/reduce/argmax_body.h"

namespace ktjax {

const FloatKernels& float_kernels_avx2() {
  static const FloatKernels k{&attention_body::attend, &matvec_body::rows,
                              &argmax_body::argmax_range, &activation_body::gated_activation,
                              &activation_body::add_scaled};
  return k;
}

}  // namespace ktjax
