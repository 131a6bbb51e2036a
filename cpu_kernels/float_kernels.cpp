#include "cpu_kernels/float_kernels.h"

namespace ktjax {

const FloatKernels& float_kernels(Isa isa) {
  switch (clamp_isa(isa)) {
    case Isa::Amx:
    case Isa::Avx512: return float_kernels_avx512();
    case Isa::Avx2: return float_kernels_avx2();
    case Isa::Generic: break;
  }
  return float_kernels_generic();
}

}  // namespace ktjax
