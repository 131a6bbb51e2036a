// Quantized linear y[T, N] = x[T, K] @ W[N, K]^T on packed weights (formats/packed.h).
//
// Integer formats quantize activations per token and per weight group to int8 with an f32
// scale (as llama.cpp's Q8 activations), then use integer dot products (vpdpbusd):
//   y[t, n] = sum_g (scale_w[n,g] * scale_x[t,g]) * sum_{k in g} q_w * q_x
//                  + min_w[n,g] * scale_x[t,g] * sum_{k in g} q_x
// bf16 weights round activations to bf16 (vdpbf16ps). Every ISA computes this same
// formula, except that AMX calls of >= 16 tokens on group-scaled int weights round the
// activations to bf16 and multiply the weights dequantized to bf16 (scale * q + min, one
// rounding): there a group's tile product has only 32 (or 16) of a tile's 64 k and its
// int32 result needs scaling per token row, which left the tile unit waiting
// (docs/kernel-notes.md#amx-linear).
// reference_kernels gives each level's formula in scalar code; results differ from it only
// in float summation order.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu_kernels/formats/packed.h"
#include "cpu_kernels/isa.h"

namespace ktjax {

// Activations of T tokens prepared for one weight layout (group size and kind).
// Buffers hold rows for t rounded up to 16 tokens (AMX tiles load whole 16-row blocks);
// rows past t are never written to outputs.
struct QuantActs {
  int64_t t = 0, kp = 0;
  int group = 32;
  bool bf16 = false;
  // q / bf rows stored as AMX A tiles, [t / 16][steps][16 rows][64 bytes], so 16 tokens'
  // bytes of one K step are one contiguous 1 KiB tile (a tile of row-major rows strides K
  // bytes: its rows alias the same L1 sets and no prefetcher follows them).
  bool tiled = false;
  AlignedVector<int8_t> q;     // [t, kp] (or tiled), zero-padded
  std::vector<float> scale;    // [t, kp / group]
  std::vector<float> bsum;     // [t, kp / group]: scale * sum(q) of the group
  std::vector<float> row_bsum; // [t], per-token scales (Row weights) only: the row's bsum total
  std::vector<int32_t> row_qsum;  // [t], Row weights only: sum(q) of the token's row
  AlignedVector<uint16_t> bf;  // [t, kp] (or tiled) bf16 bits, zero-padded (bf16 weights)

  int64_t row_bytes() const { return bf16 ? 2 * kp : kp; }
  int64_t steps() const { return (row_bytes() + 63) / 64; }  // 64-byte pieces of a row
  // Offset of byte j of token row i in q / bf. The runs prepare writes (16 values, aligned
  // to their size) never cross a piece, so they are contiguous in both layouts.
  int64_t offset(int64_t i, int64_t j) const {
    return tiled ? ((i >> 4) * steps() + (j >> 6)) * 1024 + (i & 15) * 64 + (j & 63) : i * row_bytes() + j;
  }
  int8_t* q_at(int64_t i, int64_t k) { return q.data() + offset(i, k); }
  uint16_t* bf_at(int64_t i, int64_t k) { return bf.data() + offset(i, 2 * k) / 2; }
};

struct LinearKernels {
  // Quantizes rows [t0, t1) of x (row i at x + i * ldx, k values) for weight w into the
  // same rows of out. Returns false if any value is NaN or infinite (outputs are then
  // partly written).
  bool (*prepare)(const PackedWeight& w, const float* x, int64_t t0, int64_t t1, int64_t ldx,
                  QuantActs* out);
  // y[t, n] for row blocks [rb0, rb1) of w and all tokens of a; row stride ldy. Never
  // writes rows >= w.n.
  void (*gemm)(const PackedWeight& w, const QuantActs& a, int64_t rb0, int64_t rb1, float* y,
               int64_t ldy);
  // Calls with at least this many tokens take their activations tiled (0: never).
  int64_t tile_tokens = 0;
  // Calls with at least this many tokens (0: never) on group-scaled int weights take bf16
  // activations and multiply them by the weights dequantized to bf16 (AMX).
  int64_t bf16_group_tokens = 0;
  // Whether calls of at least tile_tokens on bf16 weights take tiles too (false: they keep
  // the rows of the kernels below AMX at every token count).
  bool tile_bf16_weights = true;
};

// Batch invariance (the default; KTJAX_BATCH_INVARIANT=0 turns it off): a token's result
// must not depend on its call's token count. On AMX machines that keeps group-scaled int and
// bf16 weights on the AVX-512 formula at every token count (AMX takes int8_row weights,
// whose formula every level computes alike); off, calls of >= 16 tokens take the AMX tiles
// for them too, faster and differing in the last bits from smaller calls.
bool batch_invariant();
void set_batch_invariant(bool on);

const LinearKernels& kernels_generic();
const LinearKernels& kernels_avx2();
const LinearKernels& kernels_avx512();
// AMX tiles when a call has at least 16 tokens, else the AVX-512 kernels. Never call it
// unless detected_isa() is Amx.
const LinearKernels& kernels_amx();
// Kernels of the given level, clamped to the machine's.
const LinearKernels& kernels_for(Isa isa);
// The scalar kernels with the activations kernels_for(like) gives a call: the formula that
// level computes, element by element (its tests' reference).
const LinearKernels& reference_kernels(Isa like);

// This thread's scratch buffer of at least `bytes` (64-byte aligned), valid until its next
// call on the thread. Defined out of line, so that the ISA bodies never instantiate the
// library's vector code themselves (see gemm_body.h).
uint8_t* thread_scratch(int64_t bytes);

// Sizes a's buffers for t tokens of weight w, in the layout kern's gemm reads for a call of
// layout_t tokens (0: t) (prepare expects this).
void size_acts(const LinearKernels& kern, const PackedWeight& w, int64_t t, QuantActs* a,
               int64_t layout_t = 0);

// Copies token row r of src (scales included) into row i of dst; same weight layout, either
// tiling.
void copy_act_row(const QuantActs& src, int64_t r, QuantActs* dst, int64_t i);

// Sizes out for t tokens and prepares all of them, threaded over tokens when the call is
// large. Returns false on NaN/Inf in x.
bool prepare_all(const LinearKernels& kern, const PackedWeight& w, const float* x, int64_t t,
                 int64_t ldx, QuantActs* out, int64_t layout_t = 0);

// One gemm of a batch: y[acts.t, w.n] = acts @ w^T over all of w's row blocks.
struct GemmJob {
  const PackedWeight* w;
  const QuantActs* acts;
  float* y;
  int64_t cost_per_rb;  // tokens + weight streaming, in token units
};

// Runs every job's row blocks on the pool (one linear layer, or every expert matrix of a
// MoE phase). One memory node: the jobs are cut into pieces of row blocks that threads claim
// in order as they come free (costliest jobs first, each job's pieces in memory order).
// Several nodes: each node takes its share of every job's rows (those in its memory), split
// so each of its threads gets an equal share of their estimated cost.
void run_gemms(const LinearKernels& kern, std::vector<GemmJob> jobs);

// y[t, 0:n] = x[t, 0:k] @ w^T, threaded over row blocks (run_gemms). Throws
// std::invalid_argument when x holds NaN/Inf. reference: the scalar kernels computing isa's
// formula.
void linear_forward(const PackedWeight& w, const float* x, int64_t t, float* y, Isa isa,
                    bool reference = false);
}  // namespace ktjax
