#include "cpu_kernels/store/serialize.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>

#include "cpu_kernels/quants/iq_groups.h"
#include "cpu_kernels/store/hash64.h"
#include "cpu_kernels/thread_pool.h"

namespace ktjax {
namespace {

// (kind, scale_enc, has_min, group, hi_bits, and for table layouts the source type) of every
// layout pack_gguf and pack_float make;
// the kernels are written for these and no other (formats/packed.h).
bool produced_by_packers(const PackedLayout& l) {
  const auto k = static_cast<WeightKind>(l.kind);
  const auto e = static_cast<ScaleEnc>(l.scale_enc);
  const bool f16_or_f32 = e == ScaleEnc::F16 || e == ScaleEnc::F32;
  switch (k) {
    case WeightKind::BF16:
      return e == ScaleEnc::None && !l.has_min && l.group == 32 && l.hi_bits == 0;
    case WeightKind::Int8:
      return (f16_or_f32 || e == ScaleEnc::Row) && !l.has_min && l.group == 32 && l.hi_bits == 0 &&
             (e != ScaleEnc::Row || l.k < 65536);  // Row: int32 sums over all of K
    case WeightKind::Int4:
      if (!l.has_min)  // indices into the source type's table (pack_iq)
        return iq_group_table(l.source_type) != nullptr && l.hi_bits == 0 &&
               (l.group == 32 || (l.group == 16 && e == ScaleEnc::I8)) &&
               (f16_or_f32 || e == ScaleEnc::I8 || e == ScaleEnc::E8M0);
      if (f16_or_f32) return l.group == 32 && (l.hi_bits == 0 || l.hi_bits == 1);
      if (e == ScaleEnc::I8)
        return (l.group == 16 && (l.hi_bits == 0 || l.hi_bits == 2)) ||
               (l.group == 32 && (l.hi_bits == 0 || l.hi_bits == 1));
      return false;
  }
  return false;
}

std::string name_of(size_t i, size_t count) {
  if (count == 1) return "the matrix";
  static const char* kParts[] = {"gate", "up", "down"};
  return "expert " + std::to_string(i / 3) + " " + kParts[i % 3];
}

bool same_layout(const PackedLayout& a, const PackedLayout& b) {
  return std::tie(a.kind, a.scale_enc, a.has_min, a.group, a.hi_bits, a.n, a.k) ==
         std::tie(b.kind, b.scale_enc, b.has_min, b.group, b.hi_bits, b.n, b.k);
}

}  // namespace

PackedLayout layout_of(const PackedWeight& w) {
  PackedLayout l;
  l.kind = static_cast<int>(w.kind);
  l.scale_enc = static_cast<int>(w.scale_enc);
  l.has_min = w.has_min;
  l.group = w.group;
  l.hi_bits = w.hi_bits;
  l.source_type = w.source_type;
  l.n = w.n;
  l.k = w.k;
  l.bytes = w.bytes();
  return l;
}

std::shared_ptr<StoredWeight> adopt_packed(const std::vector<PackedSource>& sources, size_t chunk) {
  const size_t count = sources.size();
  if (count == 0 || (count != 1 && count % 3 != 0))
    throw std::invalid_argument("a stored weight has 1 matrix or 3 per expert, got " + std::to_string(count));
  auto sw = std::make_shared<StoredWeight>();
  for (size_t i = 0; i < count; ++i) {
    const PackedSource& s = sources[i];
    const PackedLayout& l = s.layout;
    const std::string what = name_of(i, count);
    if (!produced_by_packers(l))
      throw std::invalid_argument(what + ": no packer makes the layout kind " + std::to_string(l.kind) +
                                  ", scales " + std::to_string(l.scale_enc) + ", group " + std::to_string(l.group) +
                                  ", " + std::to_string(l.hi_bits) + " bit planes");
    if (count > 1 && !same_layout(l, sources[i % 3].layout))
      throw std::invalid_argument(what + ": its layout differs from expert 0's");
    auto w = make_packed(static_cast<WeightKind>(l.kind), static_cast<ScaleEnc>(l.scale_enc), l.has_min, l.group,
                         l.n, l.k, l.hi_bits, /*fill=*/false);
    if (w->bytes() != l.bytes || static_cast<int64_t>(s.size) != w->bytes())
      throw std::invalid_argument(what + ": " + std::to_string(s.size) + " bytes given, its layout takes " +
                                  std::to_string(w->bytes()) + " (header says " + std::to_string(l.bytes) + ")");
    if (chunked_xxh64(s.data, s.size, chunk) != s.digest)
      throw std::invalid_argument(what + ": its bytes do not match the recorded digest (corrupt file)");
    w->source_type = l.source_type;
    if (const int8_t* table = w->kind == WeightKind::Int4 && !w->has_min ? iq_group_table(l.source_type) : nullptr) {
      w->lut = true;  // the table follows from the type, as pack_iq sets it
      for (int j = 0; j < 16; ++j) w->lut_biased[j] = static_cast<uint8_t>(table[j] + 128);
    }
    // Copied in pieces by every pool thread: the pages land on the nodes make_packed bound.
    uint8_t* dst = w->data.get();
    const int64_t pieces = static_cast<int64_t>((s.size + chunk - 1) / chunk);
    parallel_for_balanced(pieces, [&](int64_t b, int64_t e) {
      const size_t off = static_cast<size_t>(b) * chunk;
      const size_t end = std::min(s.size, static_cast<size_t>(e) * chunk);
      std::memcpy(dst + off, s.data + off, end - off);
    });
    sw->mats.push_back(std::move(w));
  }
  return sw;
}

}  // namespace ktjax
