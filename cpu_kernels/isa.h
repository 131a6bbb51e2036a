// Instruction-set levels of the host kernels and their run-time selection.
#pragma once

#include <cstdint>
#include <string>

namespace ktjax {

// Ordered: a higher level implies every lower one on the machines we target.
enum class Isa : int { Generic = 0, Avx2 = 1, Avx512 = 2, Amx = 3 };

// Highest level this CPU and OS support (CPUID + XGETBV; AMX also needs the kernel's
// permission for tile state, requested once here through arch_prctl).
Isa detected_isa();

// Level kernels use: detected_isa(), lowered by KTJAX_ISA=generic|avx2|avx512|amx (read
// once) or by set_isa_override(). A request above the detected level is clamped to it.
Isa active_isa();

// Forces a level for this process (clamped to detected_isa()); nullptr-equivalent "" clears.
void set_isa_override(const std::string& name);

// Clamps a requested level to what the machine supports.
Isa clamp_isa(Isa requested);

const char* isa_name(Isa isa);

// Throws std::invalid_argument naming the accepted values.
Isa parse_isa(const std::string& name);

// Whether decode GEMVs give each thread one contiguous row range (linear.cpp's run_gemms) and
// read long ranges as one stream, row block after row block (AMD), rather than short pieces
// claimed in turn, several row blocks side by side with software prefetch (others): AMD's
// prefetchers follow one long stream better, Intel's (the AMX host) read the tiles faster
// (docs/kernel-notes.md#single-stream-decode).
bool single_stream_decode();

// Bytes of the largest CPU cache (the last level) as sysfs reports it, 32 MiB if it does not.
int64_t last_level_cache_bytes();

}  // namespace ktjax
