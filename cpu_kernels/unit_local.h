// Containers for code compiled with an ISA's flags (amx/, avx512/, avx2/ and the bodies they
// include). A std::vector<float> such a unit resizes instantiates the library's vector code
// with that unit's flags under a name every unit shares, and the linker keeps one copy for
// all callers: a zmm copy loop from an AVX-512 unit then ran on AVX2 CPUs (issue 25). The
// allocator's owner tag sits in an anonymous namespace, so each unit's UnitVector is a type
// of its own and its member functions have internal linkage (scripts/check_isa_isolation.py
// proves it over the built module).
#pragma once

#include <vector>

#include "cpu_kernels/formats/packed.h"

namespace ktjax {
namespace {

struct ThisUnit {};  // internal linkage: a type no other unit shares

template <class T>
using UnitVector = std::vector<T, CacheAligned<T, ThisUnit>>;

}  // namespace
}  // namespace ktjax
