// Containers for code compiled with an ISA's flags (amx/, avx512/, avx2/ and the bodies they
// include). A std::vector<float> such a unit resizes instantiates the library's vector code
// with that unit's flags under a name every unit shares, and the linker keeps one copy for
// all callers: a zmm copy loop from an AVX-512 unit then ran on AVX2 CPUs (issue 25). The
// allocator sits in an anonymous namespace, so each unit's UnitVector is a type of its own
// and its member functions have internal linkage (scripts/check_isa_isolation.py proves it
// over the built module).
#pragma once

#include <cstddef>
#include <cstdlib>
#include <new>
#include <vector>

namespace ktjax {
namespace {

// Cache-line-aligned storage (as formats/packed.h's CacheAligned, which ISA units must not
// instantiate).
template <class T>
struct UnitAllocator {
  using value_type = T;
  UnitAllocator() = default;
  template <class U>
  UnitAllocator(const UnitAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const UnitAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const UnitAllocator<U>&) const { return false; }
};

template <class T>
using UnitVector = std::vector<T, UnitAllocator<T>>;

}  // namespace
}  // namespace ktjax
