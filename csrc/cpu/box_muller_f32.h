// Box-Muller in float32 for the CPU kernels: the normals of csrc/philox.h's stream from their Philox words,
// twice the lanes of the double version in cpu_common.h (which stays the reference-exact path).
//
// Precision contract: each normal is within a few float ulps of philox_normal() (the double Box-Muller
// rounded to float): |err| <= 4e-6 max(1, |z|) is tested (tests/test_ops_specific.py), and the tail
// is the one the 32-bit u1 gives (max |z| = sqrt(64 ln 2) ~ 6.66 at x0 = 0, where every step below is exact
// or correctly rounded). How:
//  - ln u1, u1 = (x0 + 1) 2^-32: for x0 < 2^31, u1 = float(x0 + 1) 2^-32 (correctly rounded, exact below
//    2^24) is split as 2^k m, m in [sqrt2/2, sqrt2), f = m - 1 exactly; for x0 >= 2^31, where u1 rounded to
//    float would lose 1 - u1, y = 1 - u1 = (2^32 - 1 - x0) 2^-32 is formed exactly in uint32 and ln u1 =
//    log1p(-y) (k = 0, f = -y) or -ln 2 + log1p(1 - 2y) (k = -1, f = 1 - 2y, exact by Sterbenz). One
//    branchless select per lane, then Cephes' logf kernel for log1p(f), |f| <= sqrt2 - 1 (about 1 ulp).
//  - sin/cos(2 pi u2), u2 = x1 2^-32: the nearest quadrant q and the remainder t = x1 - q 2^30 (|t| <= 2^29)
//    come exactly from the integer word; the angle t 2 pi 2^-32 is formed in two parts (error ~0.5 ulp), then
//    Cephes' sinf/cosf kernels for |x| <= pi/4.
#pragma once

#include <cstdint>

#include "cpu_common.h"

namespace fpl_fast {
namespace cpu {

template <int VB>
struct F32Lanes {
  typedef float f __attribute__((vector_size(VB)));
  typedef uint32_t u __attribute__((vector_size(VB)));
  typedef int32_t i __attribute__((vector_size(VB)));
};

// -ln u1 (>= 0) for u1 = (a + 1) 2^-32, per lane of 32-bit words a.
template <int VB>
FPL_ALWAYS_INLINE typename F32Lanes<VB>::f neg_log_u1_f32(typename F32Lanes<VB>::u a) {
  using F = typename F32Lanes<VB>::f;
  using U = typename F32Lanes<VB>::u;
  using I = typename F32Lanes<VB>::i;
  constexpr float kTwoPow32Inv = 2.3283064365386963e-10f;  // 2^-32, exact
  // x0 < 2^31: musl's logf reduction (offset by sqrt2/2 so that the exponent field gives k directly).
  // a + 1 in [1, 2^31] in the lanes that use it: a signed conversion (one instruction also without AVX-512)
  // is correctly rounded there, and |.| mends 2^31, which converts to -2^31 exactly.
  const F ap1 = __builtin_convertvector((I)(a + 1u), F);
  const F u1 = vbits<F>(vbits<U>(ap1) & 0x7fffffffu) * kTwoPow32Inv;
  const U ix = vbits<U>(u1) + (0x3f800000u - 0x3f3504f3u);
  const I k_lo = (I)(ix >> 23) - 127;
  const F f_lo = vbits<F>((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  // x0 >= 2^31: y = 1 - u1 exactly in the integers, < 2^31 so the signed conversion is exact-rounded.
  const F y = __builtin_convertvector((I)(~a), F) * kTwoPow32Inv;
  const I near1 = y <= 0.29289321881345248f;  // 1 - sqrt2/2: 1 - y >= sqrt2/2
  const F f_hi = near1 ? -y : 1.0f - 2.0f * y;
  const I k_hi = near1 ? I{} : I{} - 1;
  const I upper = (I)a < 0;
  const F f = upper ? f_hi : f_lo;
  const F kf = __builtin_convertvector(upper ? k_hi : k_lo, F);
  // Cephes logf: log1p(f) = f - f^2/2 + f^3 P(f), ln 2 split as 0.693359375 - 2.12194440e-4.
  const F z = f * f;
  const F p =
      ((((((((7.0376836292e-2f * f - 1.1514610310e-1f) * f + 1.1676998740e-1f) * f - 1.2420140846e-1f) * f +
           1.4249322787e-1f) *
              f -
          1.6668057665e-1f) *
             f +
         2.0000714765e-1f) *
            f -
        2.4999993993e-1f) *
           f +
       3.3333331174e-1f) *
      f * z;
  const F lg = (f + ((p + kf * -2.12194440e-4f) - 0.5f * z)) + kf * 0.693359375f;
  return -lg;
}

// sin and cos of 2 pi b 2^-32 per lane of 32-bit words b.
template <int VB>
FPL_ALWAYS_INLINE void sincos_turn_f32(typename F32Lanes<VB>::u b, typename F32Lanes<VB>::f* sin_out,
                                       typename F32Lanes<VB>::f* cos_out) {
  using F = typename F32Lanes<VB>::f;
  using U = typename F32Lanes<VB>::u;
  using I = typename F32Lanes<VB>::i;
  constexpr float kStepHi = 1.46291804e-09f;  // float(2 pi 2^-32)
  constexpr float kStepLo = static_cast<float>(1.4629180792671596e-09 - static_cast<double>(kStepHi));
  const U q = (b + 0x20000000u) >> 30;  // nearest quadrant (mod 4: the wrap is a full turn)
  const I t = (I)(b - (q << 30));       // [-2^29, 2^29)
  const I t_hi = t & -64;               // <= 24 significant bits: exact in float
  const F th = __builtin_convertvector(t_hi, F), tl = __builtin_convertvector(t - t_hi, F);
  const F x = th * kStepHi + (tl * kStepHi + th * kStepLo);  // |x| <= pi/4
  const F z = x * x;
  const F s = x + x * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const F c = (1.0f - 0.5f * z) +
              z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f + z * 2.443315711809948e-5f));
  // Quadrant q: sin = s, c, -s, -c and cos = c, -s, -c, s.
  const I swap = (I)(q & 1u) != 0;
  const U sin_b = vbits<U>(swap ? c : s) ^ ((q & 2u) << 30);
  const U cos_b = vbits<U>(swap ? s : c) ^ (((q + 1u) & 2u) << 30);
  *sin_out = vbits<F>(sin_b);
  *cos_out = vbits<F>(cos_b);
}

// box_muller() (csrc/philox.h) in float32 on lanes of (a, b) word pairs: z0 = r cos, z1 = r sin.
template <int VB>
FPL_ALWAYS_INLINE void box_muller_f32(typename F32Lanes<VB>::u a, typename F32Lanes<VB>::u b,
                                      typename F32Lanes<VB>::f* z0, typename F32Lanes<VB>::f* z1) {
  using F = typename F32Lanes<VB>::f;
  const F two_nl = 2.0f * neg_log_u1_f32<VB>(a);
  F r;
  for (size_t l = 0; l < sizeof(F) / sizeof(float); ++l) r[l] = __builtin_sqrtf(two_nl[l]);  // one vsqrtps
  F s, c;
  sincos_turn_f32<VB>(b, &s, &c);
  *z0 = r * c;
  *z1 = r * s;
}

}  // namespace cpu
}  // namespace fpl_fast
