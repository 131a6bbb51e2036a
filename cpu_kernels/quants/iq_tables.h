// Lookup tables of GGUF's IQ and MXFP4 types (ggml-common.h), defined in iq_tables.cpp,
// which scripts/gen_iq_tables.py generates from the gguf package.
#pragma once

#include <cstdint>

namespace ktjax {

extern const int8_t kIq2xxsGrid[256][8];   // values 8, 25, 43
extern const int8_t kIq2xsGrid[512][8];
extern const int8_t kIq2sGrid[1024][8];
extern const int8_t kIq3xxsGrid[256][4];   // values 4 .. 62
extern const int8_t kIq3sGrid[512][4];     // values 1 .. 15
extern const int8_t kIq1sGrid[2048][8];    // values -1, 0, 1
extern const uint8_t kKsigns[128];         // 7 sign bits -> 8 with even parity
extern const int8_t kIq4nlValues[16];      // IQ4_NL / IQ4_XS non-linear levels
extern const int8_t kMxfp4Values[16];      // e2m1 values, doubled

}  // namespace ktjax
