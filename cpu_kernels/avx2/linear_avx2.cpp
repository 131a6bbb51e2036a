// AVX2 + FMA + F16C linear kernels: a row block is a pair of ymm (rows 0-7, 8-15).
#include <immintrin.h>

#include "cpu_kernels/linear/gemm_body.h"

namespace ktjax {
namespace {

struct V256x2 {
  struct I { __m256i a, b; };
  struct F { __m256 a, b; };
  static constexpr int kRB = 1, kTT = 2, kRBDecode = 2;  // AVX2 has 16 ymm registers
  // Without VNNI, u8 x s8 pairs saturate int16 for biased int8 weights; the sign trick
  // gives the exact signed product instead.
  static constexpr bool kInt8DotBiased = false;

  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static I zero_i() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
  static F zero_f() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static F set1(float v) { return {_mm256_set1_ps(v), _mm256_set1_ps(v)}; }
  static I load_i(const void* p) {
    const __m256i* q = static_cast<const __m256i*>(p);
    return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
  }
  static void store_i(void* p, I v) {
    __m256i* q = static_cast<__m256i*>(p);
    _mm256_storeu_si256(q, v.a);
    _mm256_storeu_si256(q + 1, v.b);
  }
  static I bcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    const __m256i b = _mm256_set1_epi32(v);
    return {b, b};
  }
  static __m256i lo4(__m256i v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0f)); }
  static I nib_lo(I v) { return {lo4(v.a), lo4(v.b)}; }
  static I nib_hi(I v) { return {lo4(_mm256_srli_epi16(v.a, 4)), lo4(_mm256_srli_epi16(v.b, 4))}; }
  // A 16-byte table in every 128-bit lane, and its entries at byte indices 0..15.
  static I load_lut(const uint8_t* t) {
    const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
    return {v, v};
  }
  static I lut16(I table, I idx) { return {_mm256_shuffle_epi8(table.a, idx.a), _mm256_shuffle_epi8(table.b, idx.b)}; }
  // Bytes 0x00 / 0xff from the 32 bits of m (byte i: bit i).
  static __m256i bits_to_bytes(uint32_t m) {
    const __m256i spread = _mm256_shuffle_epi8(  // byte i takes byte i / 8 of m
        _mm256_set1_epi32(static_cast<int>(m)),
        _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i sel = _mm256_set1_epi64x(static_cast<long long>(0x8040201008040201ull));
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, sel), sel);
  }
  // v with bit `bit` added to byte i where bit i of the 8 bytes at plane is set.
  static I add_bit(I v, const uint8_t* plane, int bit) {
    uint32_t m[2];
    std::memcpy(m, plane, 8);
    const __m256i b = _mm256_set1_epi8(static_cast<char>(1 << bit));
    return {_mm256_add_epi8(v.a, _mm256_and_si256(bits_to_bytes(m[0]), b)),
            _mm256_add_epi8(v.b, _mm256_and_si256(bits_to_bytes(m[1]), b))};
  }
  static __m256i madd(__m256i acc, __m256i u, __m256i s) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
  }
  // acc + w0 . x0 + w1 . x1, the two products summed in int16 before widening (one madd
  // and add instead of two): weights of at most 6 bits times |x| <= 127 give pair sums of
  // at most 16002, so two of them stay below 32767 and the sum is exact.
  static __m256i madd2(__m256i acc, __m256i w0, __m256i x0, __m256i w1, __m256i x1) {
    const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(s, _mm256_set1_epi16(1)));
  }
  static I dot_u4x2(I acc, I w0, I x0, I w1, I x1) {
    return {madd2(acc.a, w0.a, x0.a, w1.a, x1.a), madd2(acc.b, w0.b, x0.b, w1.b, x1.b)};
  }
  static __m256i dot8(__m256i acc, __m256i wb, __m256i x) {
    const __m256i ws = _mm256_xor_si256(wb, _mm256_set1_epi8(static_cast<char>(0x80)));
    return madd(acc, _mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws));
  }
  static I dot_i8(I acc, I w, I x) { return {dot8(acc.a, w.a, x.a), dot8(acc.b, w.b, x.b)}; }
  // bf16 pairs: the even value is the low half of each 32-bit lane.
  static __m256 dotbf(__m256 acc, __m256i w, __m256i x) {
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(w, 16)),
                          _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)), acc);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(w, hi)),
                           _mm256_castsi256_ps(_mm256_and_si256(x, hi)), acc);
  }
  static F dot_bf16(F acc, I w, I x) { return {dotbf(acc.a, w.a, x.a), dotbf(acc.b, w.b, x.b)}; }
  static I add_i(I x, I y) { return {_mm256_add_epi32(x.a, y.a), _mm256_add_epi32(x.b, y.b)}; }
  static I set1_i(int32_t v) { return {_mm256_set1_epi32(v), _mm256_set1_epi32(v)}; }
  static F cvt(I v) { return {_mm256_cvtepi32_ps(v.a), _mm256_cvtepi32_ps(v.b)}; }
  static F mul(F x, F y) { return {_mm256_mul_ps(x.a, y.a), _mm256_mul_ps(x.b, y.b)}; }
  static F add(F x, F y) { return {_mm256_add_ps(x.a, y.a), _mm256_add_ps(x.b, y.b)}; }
  static F sub(F x, F y) { return {_mm256_sub_ps(x.a, y.a), _mm256_sub_ps(x.b, y.b)}; }
  static F fmadd(F x, F y, F z) { return {_mm256_fmadd_ps(x.a, y.a, z.a), _mm256_fmadd_ps(x.b, y.b, z.b)}; }
  static F load_f32(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static F load_f16(const void* p) {
    const __m128i* q = static_cast<const __m128i*>(p);
    return {_mm256_cvtph_ps(_mm_loadu_si128(q)), _mm256_cvtph_ps(_mm_loadu_si128(q + 1))};
  }
  static F load_i8(const void* p) {
    const __m128i v = _mm_loadu_si128(static_cast<const __m128i*>(p));
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)),
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))};
  }
  // 16 e8m0 bytes as 2^(e - 128): (e - 1) << 23 as float bits, 0x00200000 << e below 2.
  static __m256 e8m0_8(__m128i bytes) {
    const __m256i e = _mm256_cvtepu8_epi32(bytes);
    const __m256i tiny = _mm256_cmpgt_epi32(_mm256_set1_epi32(2), e);
    const __m256i normal = _mm256_slli_epi32(_mm256_sub_epi32(e, _mm256_set1_epi32(1)), 23);
    const __m256i small = _mm256_sllv_epi32(_mm256_set1_epi32(0x00200000), e);
    return _mm256_castsi256_ps(_mm256_blendv_epi8(normal, small, tiny));
  }
  static F load_e8m0(const void* p) {
    const __m128i v = _mm_loadu_si128(static_cast<const __m128i*>(p));
    return {e8m0_8(v), e8m0_8(_mm_srli_si128(v, 8))};
  }
  static void store_rows(float* y, F v, int valid) {
    if (valid == 16) {
      _mm256_storeu_ps(y, v.a);
      _mm256_storeu_ps(y + 8, v.b);
      return;
    }
    alignas(32) float tmp[16];
    _mm256_store_ps(tmp, v.a);
    _mm256_store_ps(tmp + 8, v.b);
    for (int i = 0; i < valid; ++i) y[i] = tmp[i];
  }
  static float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static float abs_max(F v) {
    const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    return hmax(_mm256_max_ps(_mm256_and_ps(v.a, mask), _mm256_and_ps(v.b, mask)));
  }
  static int quant16(const float* x, float id, int8_t* out) {
    const __m256 s = _mm256_set1_ps(id);
    const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), s));
    const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), s));
    // packs interleave 128-bit lanes: a0 b0 a1 b1 -> permute back to a0 a1 b0 b1.
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xd8);
    const __m128i q = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), q);
    __m256i t = _mm256_add_epi32(a, b);
    __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4e));
    u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0xb1));
    return _mm_cvtsi128_si32(u);
  }
  // Round to nearest even, as the AVX-512 BF16 conversion and the scalar reference do.
  static void to_bf16(const float* x, uint16_t* out) {
    for (int h = 0; h < 16; h += 8) {
      const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(x + h));
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
      const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
      const __m128i p = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + h), p);
    }
  }
  static bool all_finite(F bad) {
    const __m256 o = _mm256_or_ps(_mm256_cmp_ps(bad.a, bad.a, _CMP_UNORD_Q),
                                  _mm256_cmp_ps(bad.b, bad.b, _CMP_UNORD_Q));
    return _mm256_movemask_ps(o) == 0;
  }
};

}  // namespace

const LinearKernels& kernels_avx2() {
  static const LinearKernels k{&body::prepare<V256x2>, &body::gemm<V256x2>};
  return k;
}

}  // namespace ktjax
