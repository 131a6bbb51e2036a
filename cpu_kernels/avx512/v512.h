// The AVX-512 (F/BW/VL/DQ + VNNI + BF16) vector type of the shared kernel bodies
// (linear/gemm_body.h): one zmm per row block. Include only from translation units built
// with the AVX-512 flags (avx512/, amx/); V512 gets internal linkage there, as gemm_body.h
// requires.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace ktjax {
namespace {

struct V512 {
  using I = __m512i;
  using F = __m512;
  static constexpr int kRB = 2, kTT = 4, kRBDecode = 4;  // <= 8 int + 8 float accumulators
  static constexpr bool kInt8DotBiased = true;  // vpdpbusd: weight is the unsigned operand

  static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
  static I zero_i() { return _mm512_setzero_si512(); }
  static F zero_f() { return _mm512_setzero_ps(); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static I load_i(const void* p) { return _mm512_loadu_si512(p); }
  static void store_i(void* p, I v) { _mm512_storeu_si512(p, v); }
  static I bcast4(const void* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return _mm512_set1_epi32(v);
  }
  static I nib_lo(I v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0f)); }
  static I nib_hi(I v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0f)); }
  // A 16-byte table in every 128-bit lane, and its entries at byte indices 0..15.
  static I load_lut(const uint8_t* t) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
  }
  static I lut16(I table, I idx) { return _mm512_shuffle_epi8(table, idx); }
  // v with bit `bit` added to byte i where bit i of the 8 bytes at plane is set.
  static I add_bit(I v, const uint8_t* plane, int bit) {
    uint64_t m;
    std::memcpy(&m, plane, 8);
    return _mm512_mask_add_epi8(v, _cvtu64_mask64(m), v, _mm512_set1_epi8(static_cast<char>(1 << bit)));
  }
  // acc + w0 . x0 + w1 . x1 (unsigned weights of at most 6 bits).
  static I dot_u4x2(I acc, I w0, I x0, I w1, I x1) {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, w0, x0), w1, x1);
  }
  static I dot_i8(I acc, I w, I x) { return _mm512_dpbusd_epi32(acc, w, x); }
  static F dot_bf16(F acc, I w, I x) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x);
  }
  static I add_i(I a, I b) { return _mm512_add_epi32(a, b); }
  static I set1_i(int32_t v) { return _mm512_set1_epi32(v); }
  static F cvt(I v) { return _mm512_cvtepi32_ps(v); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F load_f32(const float* p) { return _mm512_loadu_ps(p); }
  static F load_f16(const void* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
  }
  static F load_i8(const void* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
  }
  // 16 e8m0 bytes as 2^(e - 128): (e - 1) << 23 as float bits, 0x00200000 << e below 2.
  static F load_e8m0(const void* p) {
    const __m512i e = _mm512_cvtepu8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    const __mmask16 tiny = _mm512_cmplt_epu32_mask(e, _mm512_set1_epi32(2));
    const __m512i normal = _mm512_slli_epi32(_mm512_sub_epi32(e, _mm512_set1_epi32(1)), 23);
    return _mm512_castsi512_ps(_mm512_mask_sllv_epi32(normal, tiny, _mm512_set1_epi32(0x00200000), e));
  }
  static void store_rows(float* y, F v, int valid) {
    if (valid == 16)
      _mm512_storeu_ps(y, v);
    else
      _mm512_mask_storeu_ps(y, static_cast<__mmask16>((1u << valid) - 1), v);
  }
  static float abs_max(F v) { return _mm512_reduce_max_ps(_mm512_abs_ps(v)); }
  // Rounds x * id to nearest even (MXCSR default), stores 16 int8, returns their sum.
  static int quant16(const float* x, float id, int8_t* out) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), _mm512_set1_ps(id)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtsepi32_epi8(q));
    return _mm512_reduce_add_epi32(q);
  }
  static void to_bf16(const float* x, uint16_t* out) {
    const __m256bh b = _mm512_cvtneps_pbh(_mm512_loadu_ps(x));
    std::memcpy(out, &b, 32);
  }
  static bool all_finite(F bad) {
    return _mm512_cmp_ps_mask(bad, bad, _CMP_UNORD_Q) == 0;
  }
};

}  // namespace
}  // namespace ktjax
