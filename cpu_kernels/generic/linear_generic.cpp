// Scalar reference of the linear kernels: the formula of linear.h, element by element,
// reading the packed layout through packed_value-style addressing. Baseline x86-64.
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_kernels/linear/linear.h"
#include "cpu_kernels/quants/float_bits.h"

namespace ktjax {
namespace {

int stored_q(const PackedWeight& w, const uint8_t* blk, int r, int64_t k) {
  const int64_t g = k / w.group, kk = k % w.group, quad = kk / 4, j = kk % 4;
  if (w.kind == WeightKind::Int8) return static_cast<int>(blk[w.group_off(g) + quad * 64 + r * 4 + j]) - 128;
  const uint8_t* rec = blk + w.group_off(g);
  const uint8_t v = rec[(quad / 2) * 64 + r * 4 + j];
  int q = quad % 2 ? v >> 4 : v & 0x0f;
  if (w.lut) return w.lut_biased[q] - 128;
  for (int b = 0; b < w.hi_bits; ++b) {  // plane b: bit (quad * 64 + r * 4 + j) is bit 4 + b
    const int64_t i = quad * 64 + r * 4 + j;
    q |= ((rec[plane_offset(w.group, b) + i / 8] >> (i % 8)) & 1) << (4 + b);
  }
  return q;
}

float coef(const PackedWeight& w, const uint8_t* blk, int r, int64_t g, bool min) {
  const uint8_t* p = blk + w.group_off(g) + w.group_bytes + (min ? w.coef_bytes : 0) + r * w.scale_bytes();
  switch (w.scale_enc) {
    case ScaleEnc::F16: { uint16_t h; std::memcpy(&h, p, 2); return f16_to_f32(h); }
    case ScaleEnc::F32: { float f; std::memcpy(&f, p, 4); return f; }
    case ScaleEnc::E8M0: return e8m0_half_to_f32(*p);
    case ScaleEnc::I8: {
      float sup;
      std::memcpy(&sup, blk + w.super_off(g) + (min ? 64 : 0) + r * 4, 4);
      return sup * static_cast<float>(static_cast<int8_t>(*p));
    }
    case ScaleEnc::Row: {
      float f;
      std::memcpy(&f, blk + (min ? 64 : 0) + r * 4, 4);
      return f;
    }
    case ScaleEnc::None: break;
  }
  return 0.f;
}

bool prepare(const PackedWeight& w, const float* x, int64_t t0, int64_t t1, int64_t ldx, QuantActs* out) {
  const int64_t kp = w.kp, G = w.group, groups = kp / G;
  const bool per_token = w.scale_enc == ScaleEnc::Row;  // one activation scale per token
  for (int64_t i = t0; i < t1; ++i) {
    float row_amax = 0.f;
    if (per_token)
      for (int64_t k = 0; k < w.k; ++k) {
        if (!std::isfinite(x[i * ldx + k])) return false;
        row_amax = std::fmax(row_amax, std::fabs(x[i * ldx + k]));
      }
    float row_bsum = 0.f;
    int32_t row_qsum = 0;
    for (int64_t g = 0; g < groups; ++g) {
      float v[32] = {};
      for (int64_t j = 0; j < G; ++j) {
        const int64_t k = g * G + j;
        v[j] = k < w.k ? x[i * ldx + k] : 0.f;
        if (!std::isfinite(v[j])) return false;  // before any float -> int conversion
      }
      if (out->bf16) {
        for (int64_t j = 0; j < G; ++j) out->bf[i * kp + g * G + j] = f32_to_bf16(v[j]);
        continue;
      }
      float amax = row_amax;
      if (!per_token)
        for (int64_t j = 0; j < G; ++j) amax = std::fmax(amax, std::fabs(v[j]));
      const float d = amax / 127.f;
      const float id = d != 0.f ? 1.f / d : 0.f;
      int sum = 0;
      for (int64_t j = 0; j < G; ++j) {
        const int q = static_cast<int>(std::nearbyint(v[j] * id));
        out->q[i * kp + g * G + j] = static_cast<int8_t>(q);
        sum += q;
      }
      out->scale[i * groups + g] = d;
      out->bsum[i * groups + g] = d * static_cast<float>(sum);
      row_bsum += out->bsum[i * groups + g];
      row_qsum += sum;
    }
    if (per_token && !out->bf16) out->row_bsum[i] = row_bsum, out->row_qsum[i] = row_qsum;
  }
  return true;
}

// Weight (r, k) of a row block as bf16 (as float): bf16 weights as stored; int weights
// dequantized, scale * q + min in one rounding, then rounded to bf16.
float bf16_weight(const PackedWeight& w, const uint8_t* blk, int r, int64_t k) {
  if (w.kind == WeightKind::BF16) {
    uint16_t b;
    std::memcpy(&b, blk + (k / 2) * 64 + r * 4 + (k % 2) * 2, 2);
    return bf16_to_f32(b);
  }
  const int64_t g = k / w.group;
  const float v = std::fma(coef(w, blk, r, g, false), static_cast<float>(stored_q(w, blk, r, k)),
                           w.has_min ? coef(w, blk, r, g, true) : 0.f);
  return bf16_to_f32(f32_to_bf16(v));
}

void gemm(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y,
          int64_t ldy) {
  const int64_t groups = w.kp / w.group;
  std::vector<float> wrow(a.bf16 ? w.kp : 0);
  for (int64_t rb = rb0; rb < rb1; ++rb) {
    const uint8_t* blk = w.block(rb);
    for (int r = 0; r < kRowBlock && rb * kRowBlock + r < w.n; ++r) {
      for (size_t k = 0; k < wrow.size(); ++k) wrow[k] = bf16_weight(w, blk, r, static_cast<int64_t>(k));
      for (int64_t t = 0; t < a.t; ++t) {
        float acc = 0.f;
        if (a.bf16) {
          for (int64_t k = 0; k < w.kp; ++k) acc += wrow[k] * bf16_to_f32(a.bf[t * a.kp + k]);
        } else if (w.scale_enc == ScaleEnc::Row) {  // all of K in int32, as the AMX tiles
          int64_t c = 0;  // the biased weights' products
          for (int64_t k = 0; k < w.kp; ++k) c += (stored_q(w, blk, r, k) + 128) * a.q[t * a.kp + k];
          acc = coef(w, blk, r, 0, false) *
                std::fma(a.scale[t * groups], static_cast<float>(static_cast<int32_t>(c)), -128.f * a.row_bsum[t]);
        } else {
          for (int64_t g = 0; g < groups; ++g) {
            int dot = 0;
            for (int64_t j = 0; j < w.group; ++j)
              dot += stored_q(w, blk, r, g * w.group + j) * a.q[t * a.kp + g * w.group + j];
            const float m = w.has_min ? coef(w, blk, r, g, true) : 0.f;
            acc += static_cast<float>(dot) * (coef(w, blk, r, g, false) * a.scale[t * groups + g]) +
                   m * a.bsum[t * groups + g];
          }
        }
        y[t * ldy + rb * kRowBlock + r] = acc;
      }
    }
  }
}

}  // namespace

const LinearKernels& kernels_generic() {
  static const LinearKernels k{&prepare, &gemm};
  return k;
}

}  // namespace ktjax
