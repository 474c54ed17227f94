// Helpers shared by the CPU kernels: per-ISA variants of the hot loops, the Philox noise fill, small dense
// products.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>

#include "../philox.h"
#include "cpu_isa.h"

// The hot loops are compiled for AVX-512 and AVX2 (+FMA) next to the baseline, and each call runs the variant
// of the level chosen at load (cpu_isa.h: FPL_FAST_CPU_ISA / ATEN_CPU_CAPABILITY, else the best the CPU has),
// so the wheel stays portable without -march=native and every variant can be tested on one machine.
// FPL_CPU_ISA_VARIANTS(ret, name, (params), (args), body512, body2, body) defines name##_avx512 calling
// body512, name##_avx2 calling body2, name##_default calling body, and the dispatching name: the one ISA
// switch of the CPU kernels. Without FPL_CPU_MULTI_ISA only the plain name, calling body.
#if FPL_CPU_MULTI_ISA
#define FPL_CPU_ISA_VARIANTS(ret, name, params, args, body512, body2, body)                          \
  __attribute__((target("arch=x86-64-v4"))) static ret name##_avx512 params { return body512 args; } \
  __attribute__((target("arch=x86-64-v3"))) static ret name##_avx2 params { return body2 args; }     \
  static ret name##_default params { return body args; }                                             \
  [[maybe_unused]] static ret name params {                                                          \
    switch (::fpl_fast::cpu::cpu_isa()) {                                                            \
      case ::fpl_fast::cpu::CpuIsa::kAvx512:                                                         \
        return name##_avx512 args;                                                                   \
      case ::fpl_fast::cpu::CpuIsa::kAvx2:                                                           \
        return name##_avx2 args;                                                                     \
      default:                                                                                       \
        return name##_default args;                                                                  \
    }                                                                                                \
  }
#else
#define FPL_CPU_ISA_VARIANTS(ret, name, params, args, body512, body2, body) \
  [[maybe_unused]] static ret name params { return body args; }
#endif
// FPL_CPU_VARIANTS(ret, name, (params), (args)): the same body, the always-inline name##_body, for each ISA.
#define FPL_CPU_VARIANTS(ret, name, params, args) \
  FPL_CPU_ISA_VARIANTS(ret, name, params, args, name##_body, name##_body, name##_body)
// FPL_CPU_VARIANTS_VB: around name##_body<VB>, VB = 64 / 32 / 16 (the variant's vector bytes).
#define FPL_CPU_VARIANTS_VB(ret, name, params, args) \
  FPL_CPU_ISA_VARIANTS(ret, name, params, args, name##_body<64>, name##_body<32>, name##_body<16>)

#if defined(__GNUC__) || defined(__clang__)
#define FPL_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FPL_ALWAYS_INLINE inline
#endif

namespace fpl_fast {
namespace cpu {

// VB-byte vectors (512-bit by default) through the GCC/Clang vector extension: explicit SIMD that each ISA
// variant lowers to its own registers (a 512-bit vector is one zmm, two ymm or four xmm), with unaligned
// loads and stores through memcpy. Register-blocked kernels take VB from FPL_CPU_VARIANTS_VB so that their
// blocks fit the variant's register file (32 zmm, or 16 ymm / xmm) instead of spilling.
template <typename T, int VB = 64>
struct Vec {
  static constexpr int64_t kLanes = VB / sizeof(T);
  typedef T type __attribute__((vector_size(VB)));
};
template <typename T, int VB = 64>
using vec_t = typename Vec<T, VB>::type;

template <typename T, int VB = 64>
FPL_ALWAYS_INLINE vec_t<T, VB> vload(const T* p) {
  vec_t<T, VB> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T, typename VT>
FPL_ALWAYS_INLINE void vstore(T* p, VT v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T, typename VT>
FPL_ALWAYS_INLINE T hsum(VT v) {
  T s = 0;
  for (size_t l = 0; l < sizeof(VT) / sizeof(T); ++l) s += v[l];
  return s;
}

// ---- The Philox + Box-Muller stream (csrc/philox.h), eight counters at a time ----
// The scalar libm log/cos/sin dominated the DP ops on the CPU (~70 ns per normal), so the 32 normals of eight
// counters are made together: Philox on eight lanes (the compiler vectorises the widening multiplies) and
// Box-Muller on 8-lane doubles with fdlibm's log and sin/cos kernels (< 1 ulp in double, like libm), so the
// float normals are those of philox_normal() but for a double rounding tie, which tolerances absorb.
using vec_u64 = vec_t<uint64_t>;
constexpr int64_t kNormalLanes = Vec<double>::kLanes;  // counters per step

template <typename To, typename From>
FPL_ALWAYS_INLINE To vbits(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &v, sizeof(t));
  return t;
}

// Exact double of integer lanes below 2^52 (no int64 -> double instruction before AVX-512DQ).
FPL_ALWAYS_INLINE vec_t<double> small_u64_to_double(vec_u64 a) {
  constexpr double k2p52 = 4503599627370496.0;
  return vbits<vec_t<double>>(a | vbits<uint64_t>(k2p52)) - k2p52;
}

// ln(x) for normal x > 0 (fdlibm e_log.c): x = 2^k m, m in [sqrt(2)/2, sqrt(2)), ln m = 2 atanh(f / (2 + f)).
FPL_ALWAYS_INLINE vec_t<double> vlog_pos(vec_t<double> x) {
  using vd = vec_t<double>;
  const vec_u64 bits = vbits<vec_u64>(x);
  const vd m1 = vbits<vd>((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull);  // [1, 2)
  const vec_u64 big = vbits<vec_u64>(m1 > 1.4142135623730951);  // all ones where m1 > sqrt 2
  const vd m = vbits<vd>((vbits<vec_u64>(m1 * 0.5) & big) | (vbits<vec_u64>(m1) & ~big));
  const vd k = small_u64_to_double((bits >> 52) + (big & 1)) - 1023.0;
  const vd f = m - 1.0;
  const vd s = f / (2.0 + f), z = s * s, w = z * z;
  const vd t1 =
      w * (3.999999999940941908e-01 + w * (2.222219843214978396e-01 + w * 1.531383769920937332e-01));
  const vd t2 =
      z * (6.666666666666735130e-01 +
           w * (2.857142874366239149e-01 + w * (1.818357216161805012e-01 + w * 1.479819860511658591e-01)));
  const vd R = t2 + t1, hfsq = 0.5 * f * f;
  return k * 6.93147180369123816490e-01 - ((hfsq - (s * (hfsq + R) + k * 1.90821492927058770002e-10)) - f);
}

// sin and cos of x in [0, 2 pi] (fdlibm k_sin.c / k_cos.c after a three-part Cody-Waite reduction by pi/2).
FPL_ALWAYS_INLINE void vsincos_2pi(vec_t<double> x, vec_t<double>* sin_x, vec_t<double>* cos_x) {
  using vd = vec_t<double>;
  constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer in the low bits
  const vd t = x * 6.36619772367581382433e-01 + kRound;
  const vec_u64 q = vbits<vec_u64>(t) & 3;
  const vd n = t - kRound;
  const vd y = ((x - n * 1.57079632673412561417e+00) - n * 6.07710050630396597660e-11) -
               n * 2.02226624879595063154e-21;
  const vd z = y * y;
  const vd ps = -1.66666666666666324348e-01 +
                z * (8.33333333332248946124e-03 +
                     z * (-1.98412698298579493134e-04 +
                          z * (2.75573137070700676789e-06 +
                               z * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10))));
  const vd s = y + (z * y) * ps;
  const vd pc = 4.16666666666666019037e-02 +
                z * (-1.38888888888741095749e-03 +
                     z * (2.48015872894767294178e-05 +
                          z * (-2.75573143513906633035e-07 +
                               z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11))));
  const vd hz = 0.5 * z, w = 1.0 - hz;
  const vd c = w + (((1.0 - w) - hz) + z * (z * pc));
  // Quadrant q: sin x = s, c, -s, -c and cos x = c, -s, -c, s.
  const vec_u64 swap = -(q & 1);
  const vec_u64 sb = vbits<vec_u64>(s), cb = vbits<vec_u64>(c);
  const vec_u64 sin_b = ((cb & swap) | (sb & ~swap)) ^ ((q & 2) << 62);
  const vec_u64 cos_b = ((sb & swap) | (cb & ~swap)) ^ (((q + 1) & 2) << 62);
  *sin_x = vbits<vd>(sin_b);
  *cos_x = vbits<vd>(cos_b);
}

// sqrt(x) for x >= 0 (or -0) to about an ulp: Newton on 1 / sqrt(x) from the bit-trick guess (rel. error <
// 4%, squared by each step), then one correction step on the root. The vector extension has no sqrt, and the
// per-lane libm call (errno) cost more than all of Box-Muller's other steps.
FPL_ALWAYS_INLINE vec_t<double> vsqrt_nonneg(vec_t<double> x) {
  using vd = vec_t<double>;
  const vec_u64 zero = vbits<vec_u64>(x == 0.0);
  const vd xs = vbits<vd>((vbits<vec_u64>(x) & ~zero) | (vbits<vec_u64>(vd{} + 1.0) & zero));  // 0 -> 1
  vd y = vbits<vd>(0x5fe6eb50c7b537a9ull - (vbits<vec_u64>(xs) >> 1));
  const vd hx = 0.5 * xs;
  for (int it = 0; it < 4; ++it) y = y * (1.5 - hx * (y * y));
  const vd s = x * y;
  return s + (0.5 * y) * (x - s * s);
}

// box_muller() (csrc/philox.h) on eight (a, b) pairs of 32-bit words held in 64-bit lanes.
FPL_ALWAYS_INLINE void vbox_muller(vec_u64 a, vec_u64 b, vec_t<double>* z0, vec_t<double>* z1) {
  constexpr double kTwoPow32Inv = 2.3283064365386963e-10;
  constexpr double kTwoPi = 6.283185307179586;
  const vec_t<double> u1 = (small_u64_to_double(a) + 1.0) * kTwoPow32Inv;
  const vec_t<double> u2 = small_u64_to_double(b) * kTwoPow32Inv;
  const vec_t<double> r = vsqrt_nonneg(-2.0 * vlog_pos(u1));
  vec_t<double> s, c;
  vsincos_2pi(kTwoPi * u2, &s, &c);
  *z0 = r * c;
  *z1 = r * s;
}

// The four normals of each of eight counters from their Philox words (x0, x1, x2, x3), to o[0 .. 31].
FPL_ALWAYS_INLINE void normal_store(vec_u64 c0, vec_u64 c1, vec_u64 c2, vec_u64 c3, float* o) {
  constexpr int64_t L = kNormalLanes;
  vec_t<double> z0, z1, z2, z3;
  vbox_muller(c0, c1, &z0, &z1);
  vbox_muller(c2, c3, &z2, &z3);
#if defined(__clang__) || __GNUC__ >= 12
  // Interleave to z0 z1 z2 z3 per counter: float pairs (z0, z1) and (z2, z3) as 64-bit lanes.
  using vf8 = float __attribute__((vector_size(32)));
  using vf16 = vec_t<float>;
  const vf8 f0 = __builtin_convertvector(z0, vf8), f1 = __builtin_convertvector(z1, vf8);
  const vf8 f2 = __builtin_convertvector(z2, vf8), f3 = __builtin_convertvector(z3, vf8);
  const vec_u64 p01 = vbits<vec_u64>(
      vf16(__builtin_shufflevector(f0, f1, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15)));
  const vec_u64 p23 = vbits<vec_u64>(
      vf16(__builtin_shufflevector(f2, f3, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15)));
  vstore(reinterpret_cast<uint64_t*>(o),
         vec_u64(__builtin_shufflevector(p01, p23, 0, 8, 1, 9, 2, 10, 3, 11)));
  vstore(reinterpret_cast<uint64_t*>(o) + L,
         vec_u64(__builtin_shufflevector(p01, p23, 4, 12, 5, 13, 6, 14, 7, 15)));
#else
  for (int64_t e = 0; e < L; ++e) {
    o[4 * e + 0] = static_cast<float>(z0[e]);
    o[4 * e + 1] = static_cast<float>(z1[e]);
    o[4 * e + 2] = static_cast<float>(z2[e]);
    o[4 * e + 3] = static_cast<float>(z3[e]);
  }
#endif
}

// Normals 4 q .. 4 (q + G L) - 1 of the (seed, offset) stream, to out[0 .. 4 G L - 1]: G groups of L counters
// whose Philox rounds are interleaved (one chain alone waits on the multiply latency).
template <int G>
FPL_ALWAYS_INLINE void normal_groups(uint64_t seed, uint64_t offset, uint64_t q, float* out) {
  constexpr int64_t L = kNormalLanes;
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  vec_u64 c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    for (int64_t e = 0; e < L; ++e) {
      const uint64_t ctr = offset + q + static_cast<uint64_t>(g * L + e);
      c0[g][e] = static_cast<uint32_t>(ctr);
      c1[g][e] = ctr >> 32;
    }
    c2[g] = vec_u64{};
    c3[g] = vec_u64{};
  }
  uint64_t k0 = static_cast<uint32_t>(seed), k1 = seed >> 32;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 = static_cast<uint32_t>(k0 + kW0);
      k1 = static_cast<uint32_t>(k1 + kW1);
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      // Lanes hold 32-bit values, so these 64-bit products are the 32 x 32 -> 64 multiplies of Philox.
      const vec_u64 p0 = c0[g] * uint64_t{kM0}, p1 = c2[g] * uint64_t{kM1};
      c0[g] = (p1 >> 32) ^ c1[g] ^ k0;
      c1[g] = p1 & 0xffffffffull;
      c2[g] = (p0 >> 32) ^ c3[g] ^ k1;
      c3[g] = p0 & 0xffffffffull;
    }
  }
  for (int g = 0; g < G; ++g) normal_store(c0[g], c1[g], c2[g], c3[g], out + 4 * g * L);
}

// Normals 4 q0 .. 4 (q0 + nq) - 1 of the (seed, offset) stream: counters offset + q0 .. offset + q0 + nq - 1.
// Four chains fit 32 vector registers; two, 16.
template <int VB>
FPL_ALWAYS_INLINE void normal_quads_body(uint64_t seed, uint64_t offset, uint64_t q0, int64_t nq,
                                         float* out) {
  constexpr int64_t L = kNormalLanes;
  constexpr int G = VB == 64 ? 4 : 2;
  int64_t q = 0;
  for (; q + G * L <= nq; q += G * L) normal_groups<G>(seed, offset, q0 + q, out + 4 * q);
  for (; q + L <= nq; q += L) normal_groups<1>(seed, offset, q0 + q, out + 4 * q);
  for (; q < nq; ++q) philox_normal4(seed, offset, q0 + static_cast<uint64_t>(q), out + 4 * q);
}
FPL_CPU_VARIANTS_VB(void, normal_quads, (uint64_t seed, uint64_t offset, uint64_t q0, int64_t nq, float* out),
                    (seed, offset, q0, nq, out))

// Normals start .. start + count - 1 of the (seed, offset) stream (csrc/philox.h), as float.
inline void fill_normals(uint64_t seed, uint64_t offset, uint64_t start, int64_t count, float* out) {
  int64_t j = 0;
  for (; j < count && (start + j) % 4 != 0; ++j) out[j] = philox_normal(seed, offset, start + j);
  const int64_t nq = (count - j) / 4;
  normal_quads(seed, offset, (start + j) / 4, nq, out + j);
  j += 4 * nq;
  for (; j < count; ++j) out[j] = philox_normal(seed, offset, start + j);
}

// Sum of squares of x[0:len].
template <typename T>
FPL_ALWAYS_INLINE T sumsq_body(int64_t len, const T* x) {
  constexpr int64_t W = Vec<T>::kLanes;
  vec_t<T> s0 = {}, s1 = {};
  int64_t e = 0;
  for (; e + 2 * W <= len; e += 2 * W) {
    const vec_t<T> a = vload(x + e), b = vload(x + e + W);
    s0 += a * a;
    s1 += b * b;
  }
  for (; e + W <= len; e += W) {
    const vec_t<T> a = vload(x + e);
    s0 += a * a;
  }
  T total = hsum<T>(s0 + s1);
  for (; e < len; ++e) total += x[e] * x[e];
  return total;
}

// out[L] = sum of the lanes of acc[L], L = 0 .. N - 1. For sixteen 16-lane float vectors a shuffle tree (four
// levels of pairwise half-swaps and adds) instead of 16 serial horizontal sums, so the reductions stay cheap
// next to the products.
template <int N, typename T, typename VT>
FPL_ALWAYS_INLINE void reduce_lanes(const VT* acc, T* out) {
#if defined(__clang__) || __GNUC__ >= 12
  if constexpr (N == 16 && std::is_same_v<T, float> && sizeof(VT) == 64) {
    VT t[8], s[4], w[2];
    for (int p = 0; p < 8; ++p) {
      t[p] = __builtin_shufflevector(acc[p], acc[p + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22,
                                     23) +
             __builtin_shufflevector(acc[p], acc[p + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                     30, 31);
    }
    for (int p = 0; p < 4; ++p) {
      s[p] =
          __builtin_shufflevector(t[p], t[p + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
          __builtin_shufflevector(t[p], t[p + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    }
    for (int p = 0; p < 2; ++p) {
      w[p] =
          __builtin_shufflevector(s[p], s[p + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
          __builtin_shufflevector(s[p], s[p + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    }
    vstore(
        out,
        __builtin_shufflevector(w[0], w[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
            __builtin_shufflevector(w[0], w[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31));
    return;
  }
#endif
  for (int l = 0; l < N; ++l) out[l] = hsum<T>(acc[l]);
}

// A pass blocks: kRowBlock rows of X x 4 rows of V, kRowBlock = 4 with 32 vector registers (AVX-512), else 2.
template <int VB>
constexpr int kRowBlock = VB == 64 ? 4 : 2;

// Vp = V (r x d) packed for factor_norms<VB>: rows in blocks of four, each block as (d_main / W, 4, W), with
// W = Vec<T, VB>::kLanes and d_main = d - d % W; r - r % 4 rows, d_main columns. The A pass then reads one
// contiguous stream per block that stays in L1 (with the row-pointer layout V and X together overflowed it,
// and the A pass ran from L2).
template <int VB, typename T>
FPL_ALWAYS_INLINE void pack_rows4_body(const T* V, int64_t r, int64_t d, T* Vp) {
  constexpr int64_t W = Vec<T, VB>::kLanes;
  const int64_t d_main = d - d % W;
  for (int64_t j0 = 0; j0 + 4 <= r; j0 += 4) {
    for (int64_t t = 0; t < d_main; t += W) {
      for (int64_t j = 0; j < 4; ++j) {
        std::memcpy(Vp + j0 * d_main + t * 4 + j * W, V + (j0 + j) * d + t, sizeof(T) * W);
      }
    }
  }
}

FPL_CPU_VARIANTS_VB(void, pack_rows4, (const float* V, int64_t r, int64_t d, float* Vp), (V, r, d, Vp))
FPL_CPU_VARIANTS_VB(void, pack_rows4, (const double* V, int64_t r, int64_t d, double* Vp), (V, r, d, Vp))

// What one sample contributes to dp_lowrank_clip_noise: A (n x r) = X V^T, and sq = the squared Frobenius
// norms
// (|A|^2, |U^T X|^2, |X|^2). X (n x d), U (n x r), V (r x d), row-major; Vp = pack_rows4(V). U^T X itself is
// never formed (the kernel sums the clipped X and multiplies by U^T once per client). Register blocks: A in
// kRowBlock x 4 lane-wise accumulators (reduced by reduce_lanes), U^T X in 8 rows x one vector of columns.
// next (may be null): the sample processed after this one, prefetched into L2 over both passes (the A pass is
// the first touch of X, and the hardware prefetchers alone left it waiting on L3).
template <int VB, typename T>
FPL_ALWAYS_INLINE void factor_norms_body(const T* X, const T* U, const T* V, const T* Vp, int64_t n,
                                         int64_t d, int64_t r, T* A, T* sq, const T* next) {
  using V_t = vec_t<T, VB>;
  constexpr int64_t W = Vec<T, VB>::kLanes;
  constexpr int RB = kRowBlock<VB>, CB = 4;
  const int64_t d_main = d - d % W;
  const char* pf = reinterpret_cast<const char*>(next);
  const char* const pf_end = pf + (next ? n * d * sizeof(T) : 0);
  V_t sx0 = {}, sx1 = {};  // |X|^2 of the rows done in the fast path
  int64_t rows_sq = 0;     // rows 0 .. rows_sq - 1 are in sx0 + sx1
  // A = X V^T.
  for (int64_t i0 = 0; i0 < n; i0 += RB) {
    const int64_t rows = std::min<int64_t>(RB, n - i0);
    for (int64_t j0 = 0; j0 < r; j0 += CB) {
      const int64_t cols = std::min<int64_t>(CB, r - j0);
      T out[RB * CB];
      if (rows == RB && cols == CB) {
        const T* x0 = X + i0 * d;
        const T* vt = Vp + j0 * d_main;
        const bool with_sq = j0 == 0 && rows_sq == i0;
        V_t acc[RB * CB] = {};
        for (int64_t t = 0; t < d_main; t += W) {
          if (pf < pf_end) {
            __builtin_prefetch(pf, 0, 2);
            pf += 64;
          }
          V_t a[RB], v[CB];
#pragma GCC unroll 4
          for (int i = 0; i < RB; ++i) a[i] = vload<T, VB>(x0 + i * d + t);
#pragma GCC unroll 4
          for (int j = 0; j < CB; ++j) v[j] = vload<T, VB>(vt + j * W);
          if (with_sq) {
#pragma GCC unroll 4
            for (int i = 0; i < RB; i += 2) {
              sx0 += a[i] * a[i];
              sx1 += a[i + 1] * a[i + 1];
            }
          }
#pragma GCC unroll 4
          for (int i = 0; i < RB; ++i) {
#pragma GCC unroll 4
            for (int j = 0; j < CB; ++j) acc[i * CB + j] += a[i] * v[j];
          }
          vt += CB * W;
        }
        if (with_sq) rows_sq = i0 + RB;
        reduce_lanes<RB * CB>(acc, out);
      } else {
        for (int64_t ii = 0; ii < rows; ++ii) {
          for (int64_t jj = 0; jj < cols; ++jj) {
            const T* xi = X + (i0 + ii) * d;
            const T* vj = V + (j0 + jj) * d;
            V_t s0 = {};
            for (int64_t t = 0; t < d_main; t += W) s0 += vload<T, VB>(xi + t) * vload<T, VB>(vj + t);
            out[ii * CB + jj] = hsum<T>(s0);
          }
        }
      }
      for (int64_t ii = 0; ii < rows; ++ii) {
        const T* xi = X + (i0 + ii) * d;
        for (int64_t jj = 0; jj < cols; ++jj) {
          const T* vj = V + (j0 + jj) * d;
          T h = out[ii * CB + jj];
          for (int64_t t = d_main; t < d; ++t) h += xi[t] * vj[t];
          A[(i0 + ii) * r + j0 + jj] = h;
        }
      }
    }
  }
  // |U^T X|^2, eight rows of U^T X (kept in registers) at a time, one vector of columns at a time.
  V_t sv0 = {}, sv1 = {};
  int64_t j0 = 0;
  for (; j0 + 8 <= r; j0 += 8) {
    for (int64_t t = 0; t < d_main; t += W) {
      for (int p = 0; p < 8 * VB / 64 && pf < pf_end; ++p, pf += 64) __builtin_prefetch(pf, 0, 2);
      V_t bj[8] = {};
      for (int64_t i = 0; i < n; ++i) {
        const V_t x = vload<T, VB>(X + i * d + t);
        const T* ui = U + i * r + j0;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) bj[j] += ui[j] * x;
      }
#pragma GCC unroll 4
      for (int j = 0; j < 8; j += 2) {
        sv0 += bj[j] * bj[j];
        sv1 += bj[j + 1] * bj[j + 1];
      }
    }
  }
  for (; j0 < r; ++j0) {
    for (int64_t t = 0; t < d_main; t += W) {
      V_t bj = {};
      for (int64_t i = 0; i < n; ++i) bj += U[i * r + j0] * vload<T, VB>(X + i * d + t);
      sv0 += bj * bj;
    }
  }
  T sv_tail = 0;
  for (int64_t t = d_main; t < d; ++t) {
    for (int64_t j = 0; j < r; ++j) {
      T e = 0;
      for (int64_t i = 0; i < n; ++i) e += U[i * r + j] * X[i * d + t];
      sv_tail += e * e;
    }
  }
  sq[0] = sumsq_body<T>(n * r, A);
  sq[1] = hsum<T>(sv0 + sv1) + sv_tail;
  T sx_tail = 0;
  for (int64_t i = 0; i < rows_sq; ++i) {
    for (int64_t t = d_main; t < d; ++t) sx_tail += X[i * d + t] * X[i * d + t];
  }
  sq[2] = hsum<T>(sx0 + sx1) + sx_tail + sumsq_body<T>((n - rows_sq) * d, X + rows_sq * d);
}

FPL_CPU_VARIANTS_VB(void, factor_norms,
                    (const float* X, const float* U, const float* V, const float* Vp, int64_t n, int64_t d,
                     int64_t r, float* A, float* sq, const float* next),
                    (X, U, V, Vp, n, d, r, A, sq, next))
FPL_CPU_VARIANTS_VB(void, factor_norms,
                    (const double* X, const double* U, const double* V, const double* Vp, int64_t n,
                     int64_t d, int64_t r, double* A, double* sq, const double* next),
                    (X, U, V, Vp, n, d, r, A, sq, next))

// B (r x d) = U^T X with U (n x r), X (n x d), row-major: eight rows of B in registers at a time.
template <int VB, typename T>
FPL_ALWAYS_INLINE void ut_x_body(const T* U, const T* X, int64_t n, int64_t d, int64_t r, T* B) {
  using V_t = vec_t<T, VB>;
  constexpr int64_t W = Vec<T, VB>::kLanes;
  const int64_t d_main = d - d % W;
  int64_t j0 = 0;
  for (; j0 + 8 <= r; j0 += 8) {
    for (int64_t t = 0; t < d_main; t += W) {
      V_t bj[8] = {};
      for (int64_t i = 0; i < n; ++i) {
        const V_t x = vload<T, VB>(X + i * d + t);
        const T* ui = U + i * r + j0;
#pragma GCC unroll 8
        for (int j = 0; j < 8; ++j) bj[j] += ui[j] * x;
      }
#pragma GCC unroll 8
      for (int j = 0; j < 8; ++j) vstore(B + (j0 + j) * d + t, bj[j]);
    }
  }
  for (; j0 < r; ++j0) {
    for (int64_t t = 0; t < d_main; t += W) {
      V_t bj = {};
      for (int64_t i = 0; i < n; ++i) bj += U[i * r + j0] * vload<T, VB>(X + i * d + t);
      vstore(B + j0 * d + t, bj);
    }
  }
  for (int64_t j = 0; j < r; ++j) {
    for (int64_t t = d_main; t < d; ++t) {
      T e = 0;
      for (int64_t i = 0; i < n; ++i) e += U[i * r + j] * X[i * d + t];
      B[j * d + t] = e;
    }
  }
}

FPL_CPU_VARIANTS_VB(void, ut_x, (const float* U, const float* X, int64_t n, int64_t d, int64_t r, float* B),
                    (U, X, n, d, r, B))
FPL_CPU_VARIANTS_VB(void, ut_x,
                    (const double* U, const double* X, int64_t n, int64_t d, int64_t r, double* B),
                    (U, X, n, d, r, B))

// y1 = sum_i w1[i] xs[i] and, when y2, y2 = sum_i w2[i] xs[i] (i = 0 .. count - 1, in that order, each xs[i]
// of length len): the clipped sums of a chunk of samples in one pass over them, one store of y per chunk
// instead of a load and a store per sample.
template <int VB, typename T>
FPL_ALWAYS_INLINE void weighted_sums_body(int64_t count, const T* const* xs, const T* w1, const T* w2,
                                          int64_t len, T* y1, T* y2) {
  using V_t = vec_t<T, VB>;
  constexpr int64_t W = Vec<T, VB>::kLanes;
  int64_t e = 0;
  if (y2 != nullptr) {
    for (; e + W <= len; e += W) {
      V_t s1 = {}, s2 = {};
      for (int64_t i = 0; i < count; ++i) {
        const V_t x = vload<T, VB>(xs[i] + e);
        s1 += w1[i] * x;
        s2 += w2[i] * x;
      }
      vstore(y1 + e, s1);
      vstore(y2 + e, s2);
    }
    for (; e < len; ++e) {
      T s1 = 0, s2 = 0;
      for (int64_t i = 0; i < count; ++i) {
        s1 += w1[i] * xs[i][e];
        s2 += w2[i] * xs[i][e];
      }
      y1[e] = s1;
      y2[e] = s2;
    }
  } else {
    for (; e + W <= len; e += W) {
      V_t s1 = {};
      for (int64_t i = 0; i < count; ++i) s1 += w1[i] * vload<T, VB>(xs[i] + e);
      vstore(y1 + e, s1);
    }
    for (; e < len; ++e) {
      T s1 = 0;
      for (int64_t i = 0; i < count; ++i) s1 += w1[i] * xs[i][e];
      y1[e] = s1;
    }
  }
}

FPL_CPU_VARIANTS_VB(void, weighted_sums,
                    (int64_t count, const float* const* xs, const float* w1, const float* w2, int64_t len,
                     float* y1, float* y2),
                    (count, xs, w1, w2, len, y1, y2))
FPL_CPU_VARIANTS_VB(void, weighted_sums,
                    (int64_t count, const double* const* xs, const double* w1, const double* w2, int64_t len,
                     double* y1, double* y2),
                    (count, xs, w1, w2, len, y1, y2))

// dst[0:len] = src[0:len] + src[stride:stride + len] + ... (count rows, added in order).
template <int VB, typename T>
FPL_ALWAYS_INLINE void sum_rows_body(int64_t count, int64_t stride, const T* src, int64_t len, T* dst) {
  using V_t = vec_t<T, VB>;
  constexpr int64_t W = Vec<T, VB>::kLanes;
  int64_t e = 0;
  for (; e + W <= len; e += W) {
    V_t s = {};
    for (int64_t c = 0; c < count; ++c) s += vload<T, VB>(src + c * stride + e);
    vstore(dst + e, s);
  }
  for (; e < len; ++e) {
    T s = 0;
    for (int64_t c = 0; c < count; ++c) s += src[c * stride + e];
    dst[e] = s;
  }
}

FPL_CPU_VARIANTS_VB(void, sum_rows,
                    (int64_t count, int64_t stride, const float* src, int64_t len, float* dst),
                    (count, stride, src, len, dst))
FPL_CPU_VARIANTS_VB(void, sum_rows,
                    (int64_t count, int64_t stride, const double* src, int64_t len, double* dst),
                    (count, stride, src, len, dst))

// y[0:len] += alpha * x[0:len].
template <typename T>
FPL_ALWAYS_INLINE void axpy_body(int64_t len, T alpha, const T* x, T* y) {
  constexpr int64_t W = Vec<T>::kLanes;
  int64_t e = 0;
  for (; e + W <= len; e += W) vstore(y + e, vload(y + e) + alpha * vload(x + e));
  for (; e < len; ++e) y[e] += alpha * x[e];
}

FPL_CPU_VARIANTS(void, axpy, (int64_t len, float alpha, const float* x, float* y), (len, alpha, x, y))
FPL_CPU_VARIANTS(void, axpy, (int64_t len, double alpha, const double* x, double* y), (len, alpha, x, y))

// Dot product of x[0:len] and y[0:len].
template <typename T>
FPL_ALWAYS_INLINE T dot_body(int64_t len, const T* x, const T* y) {
  constexpr int64_t W = Vec<T>::kLanes;
  vec_t<T> s0 = {};
  int64_t e = 0;
  for (; e + W <= len; e += W) s0 += vload(x + e) * vload(y + e);
  T total = hsum<T>(s0);
  for (; e < len; ++e) total += x[e] * y[e];
  return total;
}

FPL_CPU_VARIANTS(float, dot, (int64_t len, const float* x, const float* y), (len, x, y))
FPL_CPU_VARIANTS(double, dot, (int64_t len, const double* x, const double* y), (len, x, y))

FPL_CPU_VARIANTS(float, sumsq, (int64_t len, const float* x), (len, x))
FPL_CPU_VARIANTS(double, sumsq, (int64_t len, const double* x), (len, x))

// dst[0:len] = acc_t(src[0:len]) (or += when accumulate).
template <typename scalar_t, typename acc_t>
inline void load_acc(int64_t len, const scalar_t* src, acc_t* dst, bool accumulate) {
  if (accumulate) {
    for (int64_t e = 0; e < len; ++e) dst[e] += static_cast<acc_t>(src[e]);
  } else {
    for (int64_t e = 0; e < len; ++e) dst[e] = static_cast<acc_t>(src[e]);
  }
}

// Small dense products on row-major acc_t buffers (per client, sizes n_ctx x r x d).
// C (m x n) = A (m x k) B (k x n)   [C is overwritten]
template <typename T>
inline void mm_nn(const T* A, const T* B, T* C, int64_t m, int64_t k, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    T* c = C + i * n;
    for (int64_t e = 0; e < n; ++e) c[e] = 0;
    for (int64_t p = 0; p < k; ++p) axpy(n, A[i * k + p], B + p * n, c);
  }
}

// C (m x n) = A^T B with A (k x m), B (k x n)   [C is overwritten]
template <typename T>
inline void mm_tn(const T* A, const T* B, T* C, int64_t m, int64_t k, int64_t n) {
  for (int64_t e = 0; e < m * n; ++e) C[e] = 0;
  for (int64_t p = 0; p < k; ++p) {
    for (int64_t i = 0; i < m; ++i) axpy(n, A[p * m + i], B + p * n, C + i * n);
  }
}

// C (m x n) = A B^T with A (m x k), B (n x k)   [C is overwritten]
template <typename T>
inline void mm_nt(const T* A, const T* B, T* C, int64_t m, int64_t k, int64_t n) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) C[i * n + j] = dot(k, A + i * k, B + j * k);
  }
}

// Output sizes with the client dimension K in front when batched.
inline std::vector<int64_t> with_k(bool batched, int64_t K, std::initializer_list<int64_t> rest) {
  std::vector<int64_t> s;
  if (batched) s.push_back(K);
  s.insert(s.end(), rest.begin(), rest.end());
  return s;
}

// A contiguous copy of t in its op-math dtype (float for half/bfloat16/float, double for double).
inline at::Tensor to_acc(const at::Tensor& t) {
  const auto acc = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return t.to(acc).contiguous();
}

}  // namespace cpu
}  // namespace fpl_fast
