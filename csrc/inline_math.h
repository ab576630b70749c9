// Inline helpers shared by the CPU programs (fused_views_cpu.cpp, task_params_cpu.cpp): the
// Philox4x32-10 counter-based generator and the quarter-turn step of the polynomial sin / cos.
//
// Include this header after a file's floating-point pragmas (fp-contract, trapping math): GCC
// refuses to inline an always_inline function compiled under other floating-point settings.
#pragma once

#include <cstdint>

#if defined(__GNUC__) || defined(__clang__)
#define MTDL_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MTDL_ALWAYS_INLINE inline
#endif

namespace mtdl {

// Philox4x32-10 (Salmon et al., SC 2011; Random123's philox4x32): round multipliers and key increments.
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

// The four counter words (c0, c1, c2, c3) replaced by Philox4x32-10 of them under key (k0, k1).
MTDL_ALWAYS_INLINE void philox4x32_10(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, uint32_t k0,
                                      uint32_t k1) {
  uint32_t a = *c0, b = *c1, c = *c2, d = *c3;
#pragma GCC unroll 10
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t pb = static_cast<uint64_t>(kPhiloxM1) * c;
    const uint64_t pa = static_cast<uint64_t>(kPhiloxM0) * a;
    a = static_cast<uint32_t>(pb >> 32) ^ b ^ k0;
    c = static_cast<uint32_t>(pa >> 32) ^ d ^ k1;
    b = static_cast<uint32_t>(pb);
    d = static_cast<uint32_t>(pa);
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  *c0 = a;
  *c1 = b;
  *c2 = c;
  *c3 = d;
}

// (sin, cos) of q quarter turns plus an angle t, from s = sin t and c = cos t: quarter k = q mod 4
// (0..3) gives (s, c), (c, -s), (-s, -c), (-c, s). Single selects, so GCC vectorises loops of them.
template <typename T>
MTDL_ALWAYS_INLINE void rotate_by_quarter_turns(int k, T s, T c, T* sn, T* cs) {
  const bool odd = (k & 1) != 0;
  const T sv = odd ? c : s, cv = odd ? s : c;
  *sn = (k & 2) != 0 ? -sv : sv;
  *cs = ((k + 1) & 2) != 0 ? -cv : cv;
}

}  // namespace mtdl
