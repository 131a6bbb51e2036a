// Linear-kernel bodies shared by the SIMD levels, written once against a vector type V of
// 16 lanes (one row block): V::I holds 16 int32 (or 64 bytes), V::F 16 floats.
// Include only from an ISA translation unit: everything here sits in an anonymous namespace
// (and each unit's V in its own), so it gets internal linkage and code compiled with one
// ISA's flags can never be picked by the linker for another ISA's caller. For the same
// reason these bodies instantiate no library templates (cpu_kernels/unit_local.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "cpu_kernels/linear/linear.h"

namespace ktjax {
namespace {
namespace body {

// Scale (which = 0) or min (which = 1) vector of the group whose record starts at rec.
template <class V>
inline typename V::F load_coef(const PackedWeight& w, const uint8_t* blk, const uint8_t* rec,
                               int64_t g, int which) {
  const uint8_t* p = rec + w.group_bytes + which * w.coef_bytes;
  switch (w.scale_enc) {
    case ScaleEnc::F16: return V::load_f16(p);
    case ScaleEnc::F32: return V::load_f32(reinterpret_cast<const float*>(p));
    case ScaleEnc::E8M0: return V::load_e8m0(p);
    case ScaleEnc::I8:
      return V::mul(V::load_i8(p), V::load_f32(reinterpret_cast<const float*>(blk + w.super_off(g) + which * 64)));
    case ScaleEnc::Row: return V::load_f32(reinterpret_cast<const float*>(blk + which * 64));
    case ScaleEnc::None: break;
  }
  return V::zero_f();
}

// Software prefetch distance in group records per row-block stream: with 4 streams per
// decode tile the hardware prefetchers alone left ~20% of single-core bandwidth unused
// (Zen 5: 4 beat 8 and 16). Tiles of kPrefetch = false (single-stream decode) read one
// stream, which they follow.
constexpr int kPrefetchGroups = 4;

// Decode pieces of at least this many row blocks are read as one stream where the CPU
// prefers that (single_stream_decode); shorter ones read best as parallel streams.
constexpr int64_t kSingleStreamMinBlocks = 16;

// Writes a tile's accumulators to y, never past row w.n.
template <class V, int RB, int TT>
inline void store_tile(const PackedWeight& w, const typename V::F (&acc)[RB][TT], int64_t rb0,
                       int64_t t0, float* y, int64_t ldy) {
  for (int r = 0; r < RB; ++r) {
    const int64_t row0 = (rb0 + r) * kRowBlock;
    const int valid = static_cast<int>(w.n - row0 < kRowBlock ? w.n - row0 : kRowBlock);
    for (int t = 0; t < TT; ++t) V::store_rows(y + (t0 + t) * ldy + row0, acc[r][t], valid);
  }
}

// Bytes of an int4 row block unpacked by unpack_int4: one per weight, as int8 quads.
inline int64_t unpacked_bytes(const PackedWeight& w) { return w.kp * kRowBlock; }

// Int4 row block rb (nibbles plus kHi bit planes) as one byte per weight, laid out as the
// int8 format's quads (quad q of group g at out + (g * G / 4 + q) * 64): prefill token
// tiles then load these instead of each unpacking the same weights again.
template <class V, int G, int kHi>
void unpack_rows(const PackedWeight& w, int64_t rb, uint8_t* out) {
  const uint8_t* blk = w.block(rb);
  for (int64_t g = 0; g < w.kp / G; ++g) {
    const uint8_t* rec = blk + w.group_off(g);
    for (int p = 0; p < G / 8; ++p, out += 128) {  // chunk p: quads 2p (low nibbles), 2p + 1
      const typename V::I v = V::load_i(rec + p * 64);
      typename V::I lo = V::nib_lo(v), hi = V::nib_hi(v);
      for (int b = 0; b < kHi; ++b) {  // plane b: 8 bytes per quad
        const uint8_t* plane = rec + plane_offset(G, b) + p * 16;
        lo = V::add_bit(lo, plane, 4 + b);
        hi = V::add_bit(hi, plane + 8, 4 + b);
      }
      V::store_i(out, lo);
      V::store_i(out + 64, hi);
    }
  }
}

// The layouts with planes make_packed allows: 6-bit in groups of 16, 5-bit in groups of 32.
template <class V>
void unpack_int4(const PackedWeight& w, int64_t rb, uint8_t* out) {
  if (w.group == 16) return unpack_rows<V, 16, 2>(w, rb, out);
  unpack_rows<V, 32, 1>(w, rb, out);
}

// RB row blocks x TT tokens; G values per group; Int4 (with kHi bit planes: 4 + kHi bits)
// or (biased) Int8 weights. kUnpacked: the int4 values come from `unpacked` (unpack_int4 of
// the RB row blocks, unpacked_bytes apart). kRow (int8 with Row scales): all of K sums in
// int32 and is scaled once, y = s_w * (d * C - 128 * row_bsum) with C the biased weights'
// products, as the AMX tiles compute it, so a token's result is the same whichever path its
// call's token count picks (and on every ISA level).
// kLut (int4 with a table, no planes): nibbles become biased int8 weights by a register
// lookup (V::lut16) and take the int8 products.
template <class V, int RB, int TT, bool kInt4, int G, int kHi, bool kPrefetch, bool kUnpacked = false,
          bool kRow = false, bool kLut = false>
void tile_int(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t t0, float* y,
              int64_t ldy, const uint8_t* unpacked = nullptr) {
  using I = typename V::I;
  using F = typename V::F;
  constexpr int QG = G / 4;
  const int64_t groups = w.kp / G;
  const int8_t* xq[TT];
  for (int t = 0; t < TT; ++t) xq[t] = a.q.data() + (t0 + t) * a.kp;
  const float* xs = a.scale.data() + t0 * groups;
  const float* xb = a.bsum.data() + t0 * groups;
  const uint8_t* blk[RB];
  for (int r = 0; r < RB; ++r) blk[r] = w.data.get() + (rb0 + r) * w.block_stride;
  F acc[RB][TT];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = V::zero_f();
  // Unpacked weights were just read whole by unpack_int4: nothing ahead to fetch.
  constexpr int pf = kPrefetch && !kUnpacked ? kPrefetchGroups : 0;

  I itot[RB][TT];  // kRow: all groups' int32 sums (each group sums apart, so the chains of
                   // dependent dot products stay one group long; int adds are exact)
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TT; ++t) itot[r][t] = V::zero_i();
  const I table = kLut ? V::load_lut(w.lut_biased) : V::zero_i();
  for (int64_t g = 0; g < groups; ++g) {
    I iacc[RB][TT];
    const uint8_t* rec[RB];
    for (int r = 0; r < RB; ++r) {
      rec[r] = blk[r] + w.group_off(g);
      for (int t = 0; t < TT; ++t) iacc[r][t] = V::zero_i();
      if (pf > 0 && g + pf < groups) {
        const uint8_t* ahead = blk[r] + w.group_off(g + pf);
        for (int64_t off = 0; off < w.rec_bytes; off += 64) V::prefetch(ahead + off);
      }
    }
    if (kInt4) {
      for (int p = 0; p < QG / 2; ++p) {
        I lo[RB], hi[RB];
        for (int r = 0; r < RB; ++r) {
          if constexpr (kUnpacked) {
            const uint8_t* u = unpacked + r * unpacked_bytes(w) + (g * (QG / 2) + p) * 128;
            lo[r] = V::load_i(u);
            hi[r] = V::load_i(u + 64);
          } else {
            const I v = V::load_i(rec[r] + p * 64);
            lo[r] = V::nib_lo(v);
            hi[r] = V::nib_hi(v);
            if constexpr (kLut) {
              lo[r] = V::lut16(table, lo[r]);
              hi[r] = V::lut16(table, hi[r]);
            }
            for (int b = 0; b < kHi; ++b) {  // plane b: 8 bytes per quad, quads 2p and 2p + 1
              const uint8_t* plane = rec[r] + plane_offset(G, b) + p * 16;
              lo[r] = V::add_bit(lo[r], plane, 4 + b);
              hi[r] = V::add_bit(hi[r], plane + 8, 4 + b);
            }
          }
        }
        for (int t = 0; t < TT; ++t) {
          const I x0 = V::bcast4(xq[t] + g * G + p * 8);
          const I x1 = V::bcast4(xq[t] + g * G + p * 8 + 4);
          for (int r = 0; r < RB; ++r) {
            if constexpr (kLut)
              iacc[r][t] = V::dot_i8(V::dot_i8(iacc[r][t], lo[r], x0), hi[r], x1);
            else
              iacc[r][t] = V::dot_u4x2(iacc[r][t], lo[r], x0, hi[r], x1);
          }
        }
      }
    } else {
      for (int q = 0; q < QG; ++q) {
        I wv[RB];
        for (int r = 0; r < RB; ++r) wv[r] = V::load_i(rec[r] + q * 64);
        for (int t = 0; t < TT; ++t) {
          const I x0 = V::bcast4(xq[t] + g * G + q * 4);
          for (int r = 0; r < RB; ++r) iacc[r][t] = V::dot_i8(iacc[r][t], wv[r], x0);
        }
      }
    }
    if (kRow) {
      for (int r = 0; r < RB; ++r)
        for (int t = 0; t < TT; ++t) itot[r][t] = V::add_i(itot[r][t], iacc[r][t]);
      continue;
    }
    for (int r = 0; r < RB; ++r) {
      const F s = load_coef<V>(w, blk[r], rec[r], g, 0);
      if constexpr (kLut) {  // no min: the bias correction joins the activation side, so a
                             // group costs two FMAs a token (the IQ types' groups of 16 felt it)
        for (int t = 0; t < TT; ++t) {
          const F xw = V::kInt8DotBiased
                           ? V::fmadd(V::cvt(iacc[r][t]), V::set1(xs[t * groups + g]), V::set1(-128.f * xb[t * groups + g]))
                           : V::mul(V::cvt(iacc[r][t]), V::set1(xs[t * groups + g]));
          acc[r][t] = V::fmadd(s, xw, acc[r][t]);
        }
        continue;
      }
      F m = w.has_min ? load_coef<V>(w, blk[r], rec[r], g, 1) : V::zero_f();
      // Biased int8 dot products carry 128 * sum(q_x): fold -128 * scale into the min.
      if ((!kInt4 || kLut) && V::kInt8DotBiased) m = V::fmadd(s, V::set1(-128.f), m);
      for (int t = 0; t < TT; ++t) {
        acc[r][t] = V::fmadd(V::cvt(iacc[r][t]), V::mul(s, V::set1(xs[t * groups + g])), acc[r][t]);
        acc[r][t] = V::fmadd(m, V::set1(xb[t * groups + g]), acc[r][t]);
      }
    }
  }
  if constexpr (kRow) {
    for (int r = 0; r < RB; ++r) {
      const F s = load_coef<V>(w, blk[r], blk[r], 0, 0);
      for (int t = 0; t < TT; ++t) {
        // Unbiased dot products (AVX2's sign trick) lack 128 * sum(q_x): add it in int32.
        const F c = V::cvt(V::kInt8DotBiased ? itot[r][t] : V::add_i(itot[r][t], V::set1_i(128 * a.row_qsum[t0 + t])));
        acc[r][t] = V::mul(s, V::fmadd(V::set1(xs[t * groups]), c, V::set1(-128.f * a.row_bsum[t0 + t])));
      }
    }
  }
  store_tile<V, RB, TT>(w, acc, rb0, t0, y, ldy);
}

template <class V, int RB, int TT, bool kPrefetch>
void tile_bf16(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t t0, float* y,
               int64_t ldy) {
  using I = typename V::I;
  using F = typename V::F;
  const int64_t pairs = w.kp / 2;
  const uint16_t* xp[TT];
  for (int t = 0; t < TT; ++t) xp[t] = a.bf.data() + (t0 + t) * a.kp;
  const uint8_t* blk[RB];
  for (int r = 0; r < RB; ++r) blk[r] = w.data.get() + (rb0 + r) * w.block_stride;
  F acc[RB][TT];
  for (int r = 0; r < RB; ++r)
    for (int t = 0; t < TT; ++t) acc[r][t] = V::zero_f();
  // Records of 32 k (16 pairs, 1 KiB per row block), prefetched like the int formats.
  constexpr int pf = kPrefetch ? kPrefetchGroups : 0;
  for (int64_t g = 0; g < pairs / 16; ++g) {
    if (pf > 0 && g + pf < pairs / 16)
      for (int r = 0; r < RB; ++r)
        for (int off = 0; off < 1024; off += 64) V::prefetch(blk[r] + (g + pf) * 1024 + off);
    for (int64_t p = 16 * g; p < 16 * g + 16; ++p) {
      I wv[RB];
      for (int r = 0; r < RB; ++r) wv[r] = V::load_i(blk[r] + p * 64);
      for (int t = 0; t < TT; ++t) {
        const I x0 = V::bcast4(xp[t] + 2 * p);
        for (int r = 0; r < RB; ++r) acc[r][t] = V::dot_bf16(acc[r][t], wv[r], x0);
      }
    }
  }
  store_tile<V, RB, TT>(w, acc, rb0, t0, y, ldy);
}

// unpacked: int4 weights' unpack_int4 bytes for the tile's row blocks (else nullptr).
template <class V, int RB, int TT, bool kPrefetch = true>
void run_tile(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t t0, float* y,
              int64_t ldy, const uint8_t* unpacked = nullptr) {
  if (w.kind == WeightKind::BF16) return tile_bf16<V, RB, TT, kPrefetch>(w, a, rb0, t0, y, ldy);
  if (unpacked) {
    if (w.group == 16) return tile_int<V, RB, TT, true, 16, 0, kPrefetch, true>(w, a, rb0, t0, y, ldy, unpacked);
    return tile_int<V, RB, TT, true, 32, 0, kPrefetch, true>(w, a, rb0, t0, y, ldy, unpacked);
  }
  // The layouts make_packed allows: int8 in groups of 32; int4 in groups of 16 (6-bit with
  // planes) or 32 (5-bit with a plane), with a table (lut: the IQ types) in either.
  if (w.kind == WeightKind::Int8 && w.scale_enc == ScaleEnc::Row)
    return tile_int<V, RB, TT, false, 32, 0, kPrefetch, false, true>(w, a, rb0, t0, y, ldy);
  if (w.kind == WeightKind::Int8) return tile_int<V, RB, TT, false, 32, 0, kPrefetch>(w, a, rb0, t0, y, ldy);
  if (w.lut)
    return w.group == 16 ? tile_int<V, RB, TT, true, 16, 0, kPrefetch, false, false, true>(w, a, rb0, t0, y, ldy)
                         : tile_int<V, RB, TT, true, 32, 0, kPrefetch, false, false, true>(w, a, rb0, t0, y, ldy);
  if (w.group == 16)
    return w.hi_bits ? tile_int<V, RB, TT, true, 16, 2, kPrefetch>(w, a, rb0, t0, y, ldy)
                     : tile_int<V, RB, TT, true, 16, 0, kPrefetch>(w, a, rb0, t0, y, ldy);
  return w.hi_bits ? tile_int<V, RB, TT, true, 32, 1, kPrefetch>(w, a, rb0, t0, y, ldy)
                   : tile_int<V, RB, TT, true, 32, 0, kPrefetch>(w, a, rb0, t0, y, ldy);
}

// How many token tiles must read the same int4 weights with bit planes for unpacking them once
// (into this thread's scratch) to beat unpacking them in every tile: 2 planes (6-bit) from 2
// tiles, 1 plane (5-bit) from 4. Plain int4 never does: its nibbles take fewer instructions
// to unpack than their bytes take to load. Measured thresholds, on Zen 5 and the AMX host:
// docs/kernel-notes.md#int4-unpack-once.
inline int64_t unpack_min_tiles(const PackedWeight& w) { return w.hi_bits >= 2 ? 2 : 4; }

// Tokens [t0, t1) over row blocks [rb0, rb0 + RB): token tiles of V::kTT, then the tail.
template <class V, int RB>
void run_tokens(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t t0, int64_t t1,
                float* y, int64_t ldy) {
  constexpr int TT = V::kTT;
  uint8_t* u = nullptr;
  if (w.kind == WeightKind::Int4 && w.hi_bits > 0 && t1 - t0 >= unpack_min_tiles(w) * TT) {
    u = thread_scratch(RB * unpacked_bytes(w));
    for (int r = 0; r < RB; ++r) unpack_int4<V>(w, rb0 + r, u + r * unpacked_bytes(w));
  }
  int64_t t = t0;
  for (; t + TT <= t1; t += TT) run_tile<V, RB, TT>(w, a, rb0, t, y, ldy, u);
  switch (t1 - t) {
    case 1: run_tile<V, RB, 1>(w, a, rb0, t, y, ldy, u); break;
    case 2: if constexpr (TT > 2) run_tile<V, RB, 2>(w, a, rb0, t, y, ldy, u); break;
    case 3: if constexpr (TT > 3) run_tile<V, RB, 3>(w, a, rb0, t, y, ldy, u); break;
    default: break;
  }
}

template <class V>
void gemm(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y,
          int64_t ldy) {
  if (a.t == 1) {  // decode: wide row tiles for independent accumulation chains, or one stream
    int64_t rb = rb0;
    if (rb1 - rb0 >= kSingleStreamMinBlocks && single_stream_decode()) {
      for (; rb < rb1; ++rb) run_tile<V, 1, 1, false>(w, a, rb, 0, y, ldy);
      return;
    }
    constexpr int RB = V::kRBDecode;
    for (; rb + RB <= rb1; rb += RB) run_tile<V, RB, 1>(w, a, rb, 0, y, ldy);
    for (; rb < rb1; ++rb) run_tile<V, 1, 1>(w, a, rb, 0, y, ldy);
    return;
  }
  // Token blocks whose int8 activations stay in L2 while the row blocks stream past.
  const int64_t tb = a.kp * a.t <= (512 << 10) ? a.t : ((512 << 10) / a.kp + 3) / 4 * 4;
  for (int64_t t0 = 0; t0 < a.t; t0 += tb) {
    const int64_t t1 = t0 + tb < a.t ? t0 + tb : a.t;
    int64_t rb = rb0;
    for (; rb + V::kRB <= rb1; rb += V::kRB) run_tokens<V, V::kRB>(w, a, rb, t0, t1, y, ldy);
    for (; rb < rb1; ++rb) run_tokens<V, 1>(w, a, rb, t0, t1, y, ldy);
  }
}

// Quantizes x[t, 0:k] per group of w.group (int formats; one scale per token for Row
// weights) or rounds to bf16. Returns false at the first group holding NaN or Inf, before
// converting it (float -> int of a non-finite value is undefined).
template <class V>
bool prepare(const PackedWeight& w, const float* x, int64_t t0, int64_t t1, int64_t ldx,
             QuantActs* out) {
  const int64_t kp = w.kp, k = w.k;
  const int G = w.group;  // 16 or 32; bf16 uses 32 as its padding unit
  const int64_t groups = kp / G;
  const bool per_token = w.scale_enc == ScaleEnc::Row;
  for (int64_t i = t0; i < t1; ++i) {
    const float* xr = x + i * ldx;
    alignas(64) float buf[32];
    // Group g's values, zero-padded past k (in buf when the group is partial).
    auto group_src = [&](int64_t g) -> const float* {
      if ((g + 1) * G <= k) return xr + g * G;
      const int64_t len = k - g * G > 0 ? k - g * G : 0;
      for (int j = 0; j < 32; ++j) buf[j] = j < len ? xr[g * G + j] : 0.f;
      return buf;
    };
    auto group_amax = [&](const float* src) {
      float amax = 0.f;
      for (int h = 0; h < G; h += 16) {
        const float m = V::abs_max(V::load_f32(src + h));
        amax = m > amax ? m : amax;
      }
      return amax;
    };
    auto finite = [&](const float* src) {
      typename V::F bad = V::zero_f();  // x - x is NaN iff x is NaN or Inf
      for (int h = 0; h < G; h += 16) {
        const typename V::F v = V::load_f32(src + h);
        bad = V::add(bad, V::sub(v, v));
      }
      return V::all_finite(bad);
    };
    float row_amax = 0.f;
    if (per_token)  // every group checked before any is converted
      for (int64_t g = 0; g < groups; ++g) {
        const float* src = group_src(g);
        if (!finite(src)) return false;
        const float m = group_amax(src);
        row_amax = m > row_amax ? m : row_amax;
      }
    float row_bsum = 0.f;
    int32_t row_qsum = 0;
    for (int64_t g = 0; g < groups; ++g) {
      const float* src = group_src(g);
      if (!per_token && !finite(src)) return false;
      if (out->bf16) {
        for (int h = 0; h < G; h += 16) V::to_bf16(src + h, out->bf_at(i, g * G + h));
        continue;
      }
      const float d = (per_token ? row_amax : group_amax(src)) / 127.f;
      const float id = d != 0.f ? 1.f / d : 0.f;
      int sum = 0;
      for (int h = 0; h < G; h += 16) sum += V::quant16(src + h, id, out->q_at(i, g * G + h));
      out->scale[i * groups + g] = d;
      out->bsum[i * groups + g] = d * static_cast<float>(sum);
      row_bsum += out->bsum[i * groups + g];
      row_qsum += sum;
    }
    if (per_token && !out->bf16) out->row_bsum[i] = row_bsum, out->row_qsum[i] = row_qsum;
  }
  return true;
}

}  // namespace body
}  // namespace
}  // namespace ktjax
