// AVX-512 (F/BW/VL/DQ + VNNI + BF16) linear kernels: the shared bodies over V512.
#include "cpu_kernels/avx512/v512.h"
#include "cpu_kernels/linear/gemm_body.h"

namespace ktjax {

const LinearKernels& kernels_avx512() {
  static const LinearKernels k{&body::prepare<V512>, &body::gemm<V512>};
  return k;
}

}  // namespace ktjax
