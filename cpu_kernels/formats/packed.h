// Packed weight matrices W[N, K] for the host linear / MoE kernels.
//
// Rows are packed in blocks of kRowBlock = 16 output rows (one AVX-512 vector of int32 or
// float lanes; also the N width of an AMX B tile). Inside a row block, K is split into
// groups of `group` values that share a scale (and optionally a min):
//   w[n, k] = scale[n, g] * q[n, k] + min[n, g]       (q: int8, or unsigned 4, 5 or 6 bits)
// and group data is VNNI-ordered: for each run of 4 consecutive k ("quad"), the 16 rows'
// 4 bytes sit next to each other (64 bytes), so one broadcast of 4 activation bytes and
// one vpdpbusd cover 16 rows x 4 k. int4 stores quads 2p and 2p+1 of a group in one
// 64-byte chunk, low and high nibble. 5- and 6-bit values (hi_bits = 1 or 2: GGUF's
// Q5_0 / Q5_1 / Q5_K and Q6_K) are int4 data plus bit planes after it: plane b holds bit
// 4 + b of every value, 8 bytes per quad in the quad's byte order (bit i = byte i of the
// quad's 64), so a kernel adds a plane to the unpacked nibbles with one masked add.
// int8 values are stored biased (q + 128, uint8) so that vpdpbusd's unsigned operand is
// the weight; kernels subtract 128 * sum(x).
// Int4 with a table (PackedWeight::lut): nibbles index 16 int8 values, no min.
// bf16 has no groups: pairs of k per row, 16 rows x 2 values per 64 bytes (vdpbf16ps).
//
// Scales come in three encodings, chosen at pack time to keep GGUF data exact and small:
//   F16 / F32: one value per (row, group);
//   E8M0: one byte e per (row, group), the scale 2^(e - 128): MXFP4's exponents, exact
//       (f16 cannot span them, f32 takes 4x the bytes);
//   I8: an int8 per (row, group) times an f32 per (row, 256-value super-block) -- the
//       K-quant layout (Q2_K..Q6_K), whose sub-block scales are small integers.
// Mins use the same encoding as scales.
//   Row (int8 only, "int8_row", from float weights): one f32 scale per row, as the 16-float
//       header of the row block; records hold data only, so a row block is one contiguous
//       VNNI array and K is padded to 64 (one AMX int8 tile step). Activations for such a
//       weight get one scale per token (every group slot holds it), so the AMX kernel can
//       accumulate all of K in int32 tiles and scale once.
//
// One row block is a contiguous region that a kernel streams front to back (one stream
// per row block keeps the hardware prefetchers on track). It is a sequence of group
// records, each followed by the coefficients that group needs:
//   record = data [group_bytes] | scales [16] | mins [16]   (mins only if has_min)
// With the I8 encoding, each 256-value super-block starts with its f32 factors:
//   super = super_scales [16] f32 | super_mins [16] f32 | records of its groups
// K is padded with zero weights to a multiple of the group (bf16: of 32) and N to a
// multiple of 16 (zero rows); kernels never write rows >= N.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <new>
#include <string>
#include <vector>

namespace ktjax {

constexpr int kRowBlock = 16;
constexpr int kSuperBlock = 256;

enum class WeightKind : int { Int8 = 0, Int4 = 1, BF16 = 2 };

// Offset of int4 bit plane b inside a group record of `group` values (after the nibbles and
// planes 0..b-1, 2 * group bytes each); plane_offset(group, hi_bits) is the record's data size.
constexpr int64_t plane_offset(int64_t group, int b) { return group * (8 + 2 * b); }
enum class ScaleEnc : int { None = 0, F16 = 1, F32 = 2, I8 = 3, Row = 4, E8M0 = 5 };

struct AlignedFree {
  void operator()(void* p) const;
};

// Allocator of cache-line-aligned storage for std::vector: AMX tile rows of 64 bytes that
// straddle two lines load at a fraction of the speed, and malloc aligns large blocks to 16.
// `Owner` makes the vector type a unit's own where that matters (cpu_kernels/unit_local.h).
template <class T, class Owner = void>
struct CacheAligned {
  using value_type = T;
  template <class U>
  struct rebind {
    using other = CacheAligned<U, Owner>;
  };
  CacheAligned() = default;
  template <class U>
  CacheAligned(const CacheAligned<U, Owner>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <class U>
  bool operator==(const CacheAligned<U, Owner>&) const { return true; }
  template <class U>
  bool operator!=(const CacheAligned<U, Owner>&) const { return false; }
};
template <class T>
using AlignedVector = std::vector<T, CacheAligned<T>>;

struct PackedWeight {
  WeightKind kind = WeightKind::Int8;
  ScaleEnc scale_enc = ScaleEnc::None;
  bool has_min = false;
  int group = 32;        // values per scale group (16 or 32); 32 for bf16 padding
  int hi_bits = 0;       // Int4 only: bit planes above the nibbles (1: group 32, 2: group 16)
  int source_type = -1;  // ggml type id it came from, or -1 for float input
  // Int4 only: the nibbles are indices into this 16-entry table of int8 values, stored biased
  // (value + 128) like int8 weights, so kernels look them up in registers (a byte shuffle)
  // and take the int8 path: IQ4_NL / IQ4_XS / MXFP4 keep 4 bits a weight, exactly.
  bool lut = false;
  uint8_t lut_biased[16] = {};
  int64_t n = 0, k = 0;  // logical shape
  int64_t np = 0, kp = 0;  // padded shape

  // Layout of a row-block region (see above). Without the I8 encoding a "super" is one
  // group record with no header, and with Row one super spanning the whole row block
  // (gps_shift past any group index), so the same address arithmetic serves every format.
  int64_t group_bytes = 0;  // weight data of one group
  int64_t coef_bytes = 0;   // one coefficient vector (16 scales or 16 mins)
  int64_t rec_bytes = 0;    // group record: data, scales, mins
  int64_t super_hdr = 0;    // f32 super scales (+ mins) heading a super-block
  int64_t super_bytes = 0;  // header + records of one super-block
  int gps_shift = 0;        // log2(groups per super-block)
  int64_t block_stride = 0;

  std::unique_ptr<uint8_t, AlignedFree> data;

  int64_t groups() const { return kp / group; }
  int64_t supers() const { return kp / kSuperBlock; }
  int64_t row_blocks() const { return np / kRowBlock; }
  int64_t bytes() const { return row_blocks() * block_stride; }
  const uint8_t* block(int64_t rb) const { return data.get() + rb * block_stride; }
  uint8_t* block(int64_t rb) { return data.get() + rb * block_stride; }
  int scale_bytes() const;  // per value of the encoding
  // Offset of group g's record (its data; scales follow at +group_bytes, then mins).
  int64_t group_off(int64_t g) const {
    return (g >> gps_shift) * super_bytes + super_hdr + (g & ((int64_t{1} << gps_shift) - 1)) * rec_bytes;
  }
  // Offset of the f32 super scales covering group g (super mins follow at +64).
  int64_t super_off(int64_t g) const { return (g >> gps_shift) * super_bytes; }
  std::string describe() const;
};

// Lays out an empty (zeroed) PackedWeight of the given shape and encoding; with
// fill = false the data is left uninitialized, for a caller that writes every byte of it
// (store/serialize.cpp: weights read back from an exported file).
std::unique_ptr<PackedWeight> make_packed(WeightKind kind, ScaleEnc enc, bool has_min,
                                          int group, int64_t n, int64_t k, int hi_bits = 0,
                                          bool fill = true);

// Value of element (n, k) as float: the exact decoding of the packed format.
float packed_value(const PackedWeight& w, int64_t n, int64_t k);

// Builds a packed weight from GGUF tensor bytes (raw holds n rows of k values of type
// `ggml_type`). Quantized types are repacked exactly; F32/F16/BF16 are converted with
// pack_float to `float_fmt` (default int8). Throws std::invalid_argument on unsupported
// types or sizes.
std::unique_ptr<PackedWeight> pack_gguf(const uint8_t* raw, size_t raw_bytes, int ggml_type,
                                        int64_t n, int64_t k, const std::string& float_fmt = "int8");

// Builds a packed weight from float32 rows w[n, k] (row stride k): "int8" (groups of 32,
// symmetric), "int8_row" (one scale per row, K < 65536 so int32 sums cannot overflow),
// "int4" (groups of 32, scale + min) or "bf16".
std::unique_ptr<PackedWeight> pack_float(const float* w, int64_t n, int64_t k,
                                         const std::string& fmt);

}  // namespace ktjax
