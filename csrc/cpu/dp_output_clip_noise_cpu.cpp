// dp_output_clip_noise on the CPU: output-space per-example clipping of the logit head's cotangents + noise.
// Semantics: fpl_fast/reference.py. Per client k, with raw features X (b, D) and T (n_cls, D):
//  1. G = X T^T (dot products, work units of kClassBlock classes) and ||T_c||;
//  2. per client: cos, log-softmax, losses, the closed-form cotangent norms, the clip factors f, the weights
//     Wt[c, i] = f_i w_ic / ||x_i|| (so that A = Wt X = (f w)^T X^) and proj_c = T^_c . A_c, which is
//     sum_i f_i w_ic cos_ic: no pass over D is needed for the projection;
//  3. per block of classes: the block's normals of client k's stream, then in one pass over the block
//     release_c = s / (||T_c|| denom) (A_c - proj_c T_c / ||T_c||) + sigma C_k / denom z_c, with A_c formed
//     in registers (a b-term linear combination of the rows of X).
// No (b, n_cls, D) cotangent and no (n_cls, D) temporary is ever written; the output is written once.
// Every sum runs in an order fixed by the shapes (fixed work units), so results do not depend on the thread
// count, and a client's results do not depend on the other clients of the launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "cpu_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FPL_OUTDP_X86 1
#else
#define FPL_OUTDP_X86 0
#endif

namespace fpl_fast {
namespace {

using cpu::Vec;
using cpu::vec_t;
using cpu::vload;
using cpu::vstore;

// Classes per work unit of steps 1 and 3 (fixed: results must not depend on the thread count).
constexpr int64_t kClassBlock = 8;
// F.normalize's guard, as reference.NORM_EPS.
constexpr double kNormEps = 1e-12;

template <typename T, int VB>
struct NVec {
  static constexpr int64_t kLanes = VB / sizeof(T);
  typedef T type __attribute__((vector_size(VB)));
};

template <typename V, typename T>
FPL_ALWAYS_INLINE V nload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename V, typename T>
FPL_ALWAYS_INLINE void nstore(T* p, V v) {
  std::memcpy(p, &v, sizeof(v));
}

// ------------------------------------------------------------------------------------------------
// Normals: Philox4x32-10 + Box-Muller (csrc/philox.h) for one vector of counters at once, in double.
// log, sin and cos are fdlibm's algorithms (Sun's e_log.c, k_sin.c, k_cos.c; < 1 ulp), vectorised: the
// float32 normals agree with the scalar path and the reference except where an ulp-level difference of
// the double result crosses a float rounding boundary (about 2^-29 of them).
// ------------------------------------------------------------------------------------------------
constexpr double kMagic52 = 4503599627370496.0;  // 2^52
constexpr uint64_t kMagic52Bits = 0x4330000000000000ull;
constexpr double kMagic52h = 6755399441055744.0;  // 1.5 * 2^52
constexpr uint64_t kMagic52hBits = 0x4338000000000000ull;

template <int VB>
struct Lanes {
  typedef typename NVec<double, VB>::type d;
  typedef typename NVec<uint64_t, VB>::type u;
  typedef typename NVec<int64_t, VB>::type i;
  typedef typename NVec<float, VB / 2>::type f;
  static constexpr int kN = VB / 8;
};

// The 32 x 32 -> 64-bit products of Philox (u64 lanes holding 32-bit values). GCC lowers the generic u64
// multiply to vpmullq (3 uops, latency 15) under AVX-512 and to three vpmuludq under AVX2; vpmuludq alone is
// exact here. Plain inline (not always_inline) with their own target, so that they inline into the variant of
// their ISA once the generic code around them has.
struct MulGeneric {
  template <typename U>
  static FPL_ALWAYS_INLINE U mul(U a, uint64_t m) {
    return a * m;
  }
};
#if FPL_OUTDP_X86
struct MulSse2 {  // baseline x86-64
  static inline Lanes<16>::u mul(Lanes<16>::u a, uint64_t m) {
    return (Lanes<16>::u)_mm_mul_epu32((__m128i)a, _mm_set1_epi64x(static_cast<long long>(m)));
  }
};
#endif
#if FPL_CPU_MULTI_ISA
struct MulAvx512 {
  __attribute__((target("arch=x86-64-v4"))) static inline Lanes<64>::u mul(Lanes<64>::u a, uint64_t m) {
    return (Lanes<64>::u)_mm512_mul_epu32((__m512i)a, _mm512_set1_epi64(static_cast<long long>(m)));
  }
};
struct MulAvx2 {
  __attribute__((target("arch=x86-64-v3"))) static inline Lanes<32>::u mul(Lanes<32>::u a, uint64_t m) {
    return (Lanes<32>::u)_mm256_mul_epu32((__m256i)a, _mm256_set1_epi64x(static_cast<long long>(m)));
  }
};
#endif

// Native vector widths per ISA (GCC lowers wider generic vectors poorly under AVX2: scalar broadcasts via the
// stack), with the register blocking of the products sized for 32 (AVX-512) or 16 vector registers.
#if FPL_CPU_MULTI_ISA
struct BlocksAvx512 {
  using Mul = MulAvx512;
  static constexpr int kVB = 64;                      // vector bytes
  static constexpr int kDotRows = 4, kDotCols = 4;    // dots: rows of X x rows of T per block
  static constexpr int kCombRows = 4, kCombVecs = 4;  // combine: classes x vectors of D per block
};
struct BlocksAvx2 {
  using Mul = MulAvx2;
  static constexpr int kVB = 32;
  static constexpr int kDotRows = 2, kDotCols = 4;
  static constexpr int kCombRows = 2, kCombVecs = 4;
};
#endif
struct BlocksDefault {
#if FPL_OUTDP_X86
  using Mul = MulSse2;
#else
  using Mul = MulGeneric;
#endif
  static constexpr int kVB = 16;
  static constexpr int kDotRows = 2, kDotCols = 4;
  static constexpr int kCombRows = 2, kCombVecs = 4;
};

// Exact for 0 <= n < 2^52 (no u64 -> double conversion instruction before AVX-512DQ).
template <typename D, typename U>
FPL_ALWAYS_INLINE D u64_to_f64(U n) {
  return (D)(n | kMagic52Bits) - kMagic52;
}
// Exact for |k| < 2^51.
template <typename D, typename U, typename I>
FPL_ALWAYS_INLINE D i64_to_f64(I k) {
  return (D)((U)k + kMagic52hBits) - kMagic52h;
}

template <int VB>
FPL_ALWAYS_INLINE typename Lanes<VB>::d vsqrt(typename Lanes<VB>::d v) {
  typename Lanes<VB>::d r;
  for (int l = 0; l < Lanes<VB>::kN; ++l) r[l] = __builtin_sqrt(v[l]);  // one vsqrtpd (-fno-math-errno)
  return r;
}

// log(x) for finite normal x > 0 (e_log.c without its special cases).
template <int VB>
FPL_ALWAYS_INLINE typename Lanes<VB>::d vlog(typename Lanes<VB>::d x) {
  using D = typename Lanes<VB>::d;
  using U = typename Lanes<VB>::u;
  using I = typename Lanes<VB>::i;
  constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  constexpr double Lg1 = 6.666666666666735130e-01, Lg2 = 3.999999999940941908e-01;
  constexpr double Lg3 = 2.857142874366239149e-01, Lg4 = 2.222219843214978396e-01;
  constexpr double Lg5 = 1.818357216161805012e-01, Lg6 = 1.531383769920937332e-01;
  constexpr double Lg7 = 1.479819860511658591e-01;
  const U bits = (U)x;
  U hx = bits >> 32;
  I k = (I)(hx >> 20) - 1023;
  hx &= 0x000fffffull;
  const U i = (hx + 0x95f64ull) & 0x100000ull;  // normalise x or x/2 into [sqrt(2)/2, sqrt(2))
  const D m = (D)(((hx | (i ^ 0x3ff00000ull)) << 32) | (bits & 0xffffffffull));
  k += (I)(i >> 20);
  const D f = m - 1.0;
  const D hfsq = 0.5 * f * f;
  const D s = f / (2.0 + f);
  const D dk = i64_to_f64<D, U, I>(k);
  const D z = s * s;
  const D w = z * z;
  const D t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
  const D t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
  const D R = t2 + t1;
  return dk * ln2_hi - ((hfsq - (s * (hfsq + R) + dk * ln2_lo)) - f);
}

// sin(x) and cos(x) for 0 <= x < 2 pi: x = q pi/2 + r (Cody-Waite, q <= 4 makes q * pio2_1 exact), then
// the |r| <= pi/4 kernels of k_sin.c and k_cos.c.
template <int VB>
FPL_ALWAYS_INLINE void vsincos(typename Lanes<VB>::d x, typename Lanes<VB>::d* sin_out,
                               typename Lanes<VB>::d* cos_out) {
  using D = typename Lanes<VB>::d;
  using U = typename Lanes<VB>::u;
  using I = typename Lanes<VB>::i;
  constexpr double two_over_pi = 6.36619772367581382433e-01;
  constexpr double pio2_1 = 1.57079632673412561417e+00, pio2_1t = 6.07710050650619224932e-11;
  constexpr double S1 = -1.66666666666666324348e-01, S2 = 8.33333333332248946124e-03;
  constexpr double S3 = -1.98412698298579493134e-04, S4 = 2.75573137070700676789e-06;
  constexpr double S5 = -2.50507602534068634195e-08, S6 = 1.58969099521155010221e-10;
  constexpr double C1 = 4.16666666666666019037e-02, C2 = -1.38888888888741095749e-03;
  constexpr double C3 = 2.48015872894767294178e-05, C4 = -2.75573143513906633035e-07;
  constexpr double C5 = 2.08757232129817482790e-09, C6 = -1.13596475577881948265e-11;
  const D t = x * two_over_pi + kMagic52h;  // round to nearest: q in the low bits
  const U q = (U)t;
  const D qd = t - kMagic52h;
  const D r = (x - qd * pio2_1) - qd * pio2_1t;
  const D z = r * r;
  const D sr = r + (z * r) * (S1 + z * (S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)))));
  const D cpoly = z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
  const D hz = 0.5 * z;
  const D w = 1.0 - hz;
  const D cr = w + (((1.0 - w) - hz) + z * cpoly);
  const I odd = (I)((q & 1ull) != 0ull);
  const U sin_sign = (q & 2ull) << 62;
  const U cos_sign = ((q + 1ull) & 2ull) << 62;
  *sin_out = (D)((U)(odd ? cr : sr) ^ sin_sign);
  *cos_out = (D)((U)(odd ? sr : cr) ^ cos_sign);
}

// Normals 4 q0 .. 4 (q0 + G N) - 1 of the (seed, offset) stream (G vectors of N = Lanes<VB>::kN counters), in
// stream order. G independent Philox chains hide the latency of the 64-bit multiplies.
template <int VB, int G, typename Mul>
FPL_ALWAYS_INLINE void normals_chunk(uint64_t seed, uint64_t offset, uint64_t q0, float* out) {
  using D = typename Lanes<VB>::d;
  using U = typename Lanes<VB>::u;
  using F = typename Lanes<VB>::f;
  constexpr int N = Lanes<VB>::kN;
  constexpr uint64_t kM0 = 0xD2511F53ull, kM1 = 0xCD9E8D57ull;
  constexpr uint64_t kW0 = 0x9E3779B9ull, kW1 = 0xBB67AE85ull;
  constexpr uint64_t kLo = 0xffffffffull;
  U c0[G], c1[G], c2[G], c3[G];
  for (int g = 0; g < G; ++g) {
    U ctr;
    for (int l = 0; l < N; ++l)
      ctr[l] = offset + q0 + static_cast<uint64_t>(g * N + l);  // wraps like the scalar
    c0[g] = ctr & kLo;
    c1[g] = ctr >> 32;
    c2[g] = U{};
    c3[g] = U{};
  }
  uint64_t k0 = seed & kLo, k1 = seed >> 32;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 = (k0 + kW0) & kLo;
      k1 = (k1 + kW1) & kLo;
    }
    for (int g = 0; g < G; ++g) {
      const U p0 = Mul::mul(c0[g], kM0);  // exact: both factors < 2^32
      const U p1 = Mul::mul(c2[g], kM1);
      const U n0 = (p1 >> 32) ^ c1[g] ^ k0;
      const U n2 = (p0 >> 32) ^ c3[g] ^ k1;
      c1[g] = p1 & kLo;
      c3[g] = p0 & kLo;
      c0[g] = n0;
      c2[g] = n2;
    }
  }
  constexpr double kTwoPow32Inv = 2.3283064365386963e-10;
  constexpr double kTwoPi = 6.283185307179586;
  for (int g = 0; g < G; ++g) {
    F z[4];
    const U words[4] = {c0[g], c1[g], c2[g], c3[g]};
    for (int pair = 0; pair < 2; ++pair) {
      const D u1 = u64_to_f64<D>(words[2 * pair] + 1ull) * kTwoPow32Inv;  // (0, 1]
      const D u2 = u64_to_f64<D>(words[2 * pair + 1]) * kTwoPow32Inv;
      const D rad = vsqrt<VB>(-2.0 * vlog<VB>(u1));
      D s, c;
      vsincos<VB>(kTwoPi * u2, &s, &c);
      z[2 * pair] = __builtin_convertvector(rad * c, F);
      z[2 * pair + 1] = __builtin_convertvector(rad * s, F);
    }
    float* o = out + 4 * N * g;
    if constexpr (N == 8) {  // AVX-512: transpose (z0 | z1 | z2 | z3) into stream order with four shuffles
      typedef float f16 __attribute__((vector_size(64)));
      typedef double d8 __attribute__((vector_size(64)));
      const f16 a = __builtin_shufflevector(z[0], z[1], 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
      const f16 b = __builtin_shufflevector(z[2], z[3], 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
      const d8 lo = __builtin_shufflevector((d8)a, (d8)b, 0, 8, 1, 9, 2, 10, 3, 11);
      const d8 hi = __builtin_shufflevector((d8)a, (d8)b, 4, 12, 5, 13, 6, 14, 7, 15);
      std::memcpy(o, &lo, sizeof(lo));
      std::memcpy(o + 16, &hi, sizeof(hi));
    } else {
      for (int l = 0; l < N; ++l) {
        for (int m = 0; m < 4; ++m) o[4 * l + m] = z[m][l];
      }
    }
  }
}

// Normals start .. start + count - 1 of the (seed, offset) stream, as float (cpu::fill_normals, vectorised).
template <typename B>
FPL_ALWAYS_INLINE void fill_normals_fast_body(uint64_t seed, uint64_t offset, uint64_t start, int64_t count,
                                              float* out) {
  constexpr int kGroups = 2;
  constexpr int64_t kChunk = 4 * kGroups * Lanes<B::kVB>::kN;
  int64_t j = 0;
  for (; j < count && (start + j) % 4 != 0; ++j) out[j] = philox_normal(seed, offset, start + j);
  for (; j + kChunk <= count; j += kChunk)
    normals_chunk<B::kVB, kGroups, typename B::Mul>(seed, offset, (start + j) / 4, out + j);
  for (; j + 4 <= count; j += 4) philox_normal4(seed, offset, (start + j) / 4, out + j);
  for (; j < count; ++j) out[j] = philox_normal(seed, offset, start + j);
}

// ------------------------------------------------------------------------------------------------
// Small dense products, register-blocked.
// ------------------------------------------------------------------------------------------------
// G[i * ldg + j] = X_i . Y_j for RM rows of X from i0 and RN rows of Y from j0 (rows of length len).
template <typename T, int VB, int RM, int RN>
FPL_ALWAYS_INLINE void dot_block(const T* X, const T* Y, int64_t len, int64_t i0, int64_t j0, T* G,
                                 int64_t ldg) {
  using V = typename NVec<T, VB>::type;
  constexpr int64_t W = NVec<T, VB>::kLanes;
  const int64_t main = len - len % W;
  V acc[RM][RN] = {};
  for (int64_t e = 0; e < main; e += W) {
    V xv[RM], yv[RN];
    for (int a = 0; a < RM; ++a) xv[a] = nload<V>(X + (i0 + a) * len + e);
    for (int c = 0; c < RN; ++c) yv[c] = nload<V>(Y + (j0 + c) * len + e);
    for (int a = 0; a < RM; ++a) {
      for (int c = 0; c < RN; ++c) acc[a][c] += xv[a] * yv[c];
    }
  }
  for (int a = 0; a < RM; ++a) {
    for (int c = 0; c < RN; ++c) {
      T s = 0;
      for (int64_t l = 0; l < W; ++l) s += acc[a][c][l];
      const T* x = X + (i0 + a) * len;
      const T* y = Y + (j0 + c) * len;
      for (int64_t e = main; e < len; ++e) s += x[e] * y[e];
      G[(i0 + a) * ldg + j0 + c] = s;
    }
  }
}

// G[i * ldg + j] = X_i . Y_j for i < m, j < n.
template <typename B, typename T>
FPL_ALWAYS_INLINE void dots_body(const T* X, int64_t m, const T* Y, int64_t n, int64_t len, T* G,
                                 int64_t ldg) {
  constexpr int RM = B::kDotRows, RN = B::kDotCols, VB = B::kVB;
  int64_t i0 = 0;
  for (; i0 + RM <= m; i0 += RM) {
    int64_t j0 = 0;
    for (; j0 + RN <= n; j0 += RN) dot_block<T, VB, RM, RN>(X, Y, len, i0, j0, G, ldg);
    for (; j0 < n; ++j0) dot_block<T, VB, RM, 1>(X, Y, len, i0, j0, G, ldg);
  }
  for (; i0 < m; ++i0) {
    int64_t j0 = 0;
    for (; j0 + RN <= n; j0 += RN) dot_block<T, VB, 1, RN>(X, Y, len, i0, j0, G, ldg);
    for (; j0 < n; ++j0) dot_block<T, VB, 1, 1>(X, Y, len, i0, j0, G, ldg);
  }
}

// The release of R classes from c0, columns e0 .. e0 + RV W - 1 (RV = 0: the scalar tail e0 .. D - 1):
// out[c] = alpha[c] sum_i Wt[c, i] X_i + beta[c] T_c + gamma z[c]   (z null: no noise).
template <typename T, int VB, int R, int RV>
FPL_ALWAYS_INLINE void combine_block(int64_t b, int64_t D, const T* Wt, const T* X, const T* Tt,
                                     const T* alpha, const T* beta, T gamma, const float* z, T* out,
                                     int64_t c0, int64_t e0) {
  using V = typename NVec<T, VB>::type;
  using Z = typename NVec<float, VB * sizeof(float) / sizeof(T)>::type;  // W floats
  constexpr int64_t W = NVec<T, VB>::kLanes;
  if constexpr (RV == 0) {
    for (int64_t e = e0; e < D; ++e) {
      for (int r = 0; r < R; ++r) {
        const int64_t c = c0 + r;
        T a = 0;
        for (int64_t i = 0; i < b; ++i) a += Wt[c * b + i] * X[i * D + e];
        T val = alpha[c] * a + beta[c] * Tt[c * D + e];
        if (z != nullptr) val += gamma * static_cast<T>(z[c * D + e]);
        out[c * D + e] = val;
      }
    }
  } else {
    V acc[R][RV] = {};
    for (int64_t i = 0; i < b; ++i) {
      V xv[RV];
      for (int v = 0; v < RV; ++v) xv[v] = nload<V>(X + i * D + e0 + v * W);
      for (int r = 0; r < R; ++r) {
        const T w = Wt[(c0 + r) * b + i];
        for (int v = 0; v < RV; ++v) acc[r][v] += w * xv[v];
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t c = c0 + r;
      for (int v = 0; v < RV; ++v) {
        const int64_t e = c * D + e0 + v * W;
        V val = alpha[c] * acc[r][v] + beta[c] * nload<V>(Tt + e);
        if (z != nullptr) val += gamma * __builtin_convertvector(nload<Z>(z + e), V);
        nstore(out + e, val);
      }
    }
  }
}

// The release of RR classes from c0 over all of D.
template <typename T, int VB, int RR, int RV>
FPL_ALWAYS_INLINE void combine_rows(int64_t b, int64_t D, const T* Wt, const T* X, const T* Tt,
                                    const T* alpha, const T* beta, T gamma, const float* z, T* out,
                                    int64_t c0) {
  constexpr int64_t W = NVec<T, VB>::kLanes;
  int64_t e0 = 0;
  for (; e0 + RV * W <= D; e0 += RV * W) {
    combine_block<T, VB, RR, RV>(b, D, Wt, X, Tt, alpha, beta, gamma, z, out, c0, e0);
  }
  for (; e0 + W <= D; e0 += W)
    combine_block<T, VB, RR, 1>(b, D, Wt, X, Tt, alpha, beta, gamma, z, out, c0, e0);
  combine_block<T, VB, RR, 0>(b, D, Wt, X, Tt, alpha, beta, gamma, z, out, c0, e0);
}

// The release of classes 0 .. nc - 1 (pointers already at the block's first class; Wt rows of b weights).
template <typename B, typename T>
FPL_ALWAYS_INLINE void combine_body(int64_t nc, int64_t b, int64_t D, const T* Wt, const T* X, const T* Tt,
                                    const T* alpha, const T* beta, T gamma, const float* z, T* out) {
  constexpr int R = B::kCombRows, RV = B::kCombVecs, VB = B::kVB;
  int64_t c0 = 0;
  for (; c0 + R <= nc; c0 += R) combine_rows<T, VB, R, RV>(b, D, Wt, X, Tt, alpha, beta, gamma, z, out, c0);
  for (; c0 < nc; ++c0) combine_rows<T, VB, 1, RV>(b, D, Wt, X, Tt, alpha, beta, gamma, z, out, c0);
}

// Per-ISA variants with their own blocking (cpu_common.h's FPL_CPU_VARIANTS compiles one body three times).
#if FPL_CPU_MULTI_ISA
#define FPL_BLOCKED_VARIANTS(ret, name, params, args)                          \
  __attribute__((target("arch=x86-64-v4"))) static ret name##_avx512 params {  \
    return name##_body<BlocksAvx512> args;                                     \
  }                                                                            \
  __attribute__((target("arch=x86-64-v3"))) static ret name##_avx2 params {    \
    return name##_body<BlocksAvx2> args;                                       \
  }                                                                            \
  static ret name##_default params { return name##_body<BlocksDefault> args; } \
  static ret name params {                                                     \
    switch (::fpl_fast::cpu::cpu_isa()) {                                      \
      case ::fpl_fast::cpu::CpuIsa::kAvx512:                                   \
        return name##_avx512 args;                                             \
      case ::fpl_fast::cpu::CpuIsa::kAvx2:                                     \
        return name##_avx2 args;                                               \
      default:                                                                 \
        return name##_default args;                                            \
    }                                                                          \
  }
#else
#define FPL_BLOCKED_VARIANTS(ret, name, params, args) \
  static ret name params { return name##_body<BlocksDefault> args; }
#endif

FPL_BLOCKED_VARIANTS(void, fill_normals_fast,
                     (uint64_t seed, uint64_t offset, uint64_t start, int64_t count, float* out),
                     (seed, offset, start, count, out))
FPL_BLOCKED_VARIANTS(void, dots,
                     (const float* X, int64_t m, const float* Y, int64_t n, int64_t len, float* G,
                      int64_t ldg),
                     (X, m, Y, n, len, G, ldg))
FPL_BLOCKED_VARIANTS(void, dots,
                     (const double* X, int64_t m, const double* Y, int64_t n, int64_t len, double* G,
                      int64_t ldg),
                     (X, m, Y, n, len, G, ldg))
FPL_BLOCKED_VARIANTS(void, combine,
                     (int64_t nc, int64_t b, int64_t D, const float* Wt, const float* X, const float* Tt,
                      const float* alpha, const float* beta, float gamma, const float* z, float* out),
                     (nc, b, D, Wt, X, Tt, alpha, beta, gamma, z, out))
FPL_BLOCKED_VARIANTS(void, combine,
                     (int64_t nc, int64_t b, int64_t D, const double* Wt, const double* X, const double* Tt,
                      const double* alpha, const double* beta, double gamma, const float* z, double* out),
                     (nc, b, D, Wt, X, Tt, alpha, beta, gamma, z, out))

// ------------------------------------------------------------------------------------------------
// The op
// ------------------------------------------------------------------------------------------------
template <typename acc_t>
void dp_output_clip_noise_kernel(const at::Tensor& x_acc, const at::Tensor& t_acc, const at::Tensor& labels,
                                 const at::Tensor& mask_acc, const at::Tensor& clip_norm,
                                 const OutputDpDims& dims, double logit_scale, double noise_multiplier,
                                 c10::IntArrayRef seed, c10::IntArrayRef offset, double denominator,
                                 at::Tensor& release, at::Tensor& norms, at::Tensor& losses) {
  const int64_t K = dims.K, b = dims.b, n_cls = dims.n_cls, D = dims.D;
  const int64_t blocks = (n_cls + kClassBlock - 1) / kClassBlock;
  const auto opts = x_acc.options();
  at::Tensor cos_t = at::empty({K, b, n_cls}, opts);  // X T^T, then the cosines
  at::Tensor tn_t = at::empty({K, n_cls}, opts);      // max(||T_c||, eps)
  at::Tensor wt_t = at::empty({K, n_cls, b}, opts);   // Wt[c, i] = f_i w_ic / ||x_i||
  at::Tensor proj_t = at::empty({K, n_cls}, opts);    // sum_i f_i w_ic cos_ic
  const acc_t* xp = x_acc.data_ptr<acc_t>();
  const acc_t* tp = t_acc.data_ptr<acc_t>();
  const int64_t* yp = labels.data_ptr<int64_t>();
  const acc_t* mp = dims.has_mask ? mask_acc.data_ptr<acc_t>() : nullptr;
  const float* cp = clip_norm.data_ptr<float>();
  acc_t* gp = cos_t.data_ptr<acc_t>();
  acc_t* tnp = tn_t.data_ptr<acc_t>();
  acc_t* wp = wt_t.data_ptr<acc_t>();
  acc_t* pp = proj_t.data_ptr<acc_t>();
  float* np_ = norms.data_ptr<float>();
  float* lp = losses.data_ptr<float>();
  acc_t* outp = release.data_ptr<acc_t>();
  const acc_t s = static_cast<acc_t>(logit_scale);
  const acc_t norm_eps = static_cast<acc_t>(kNormEps);

  // 1. G = X T^T and ||T_c||, per (client, class block).
  at::parallel_for(0, K * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t k = unit / blocks, c0 = (unit % blocks) * kClassBlock;
      const int64_t nc = std::min(kClassBlock, n_cls - c0);
      const acc_t* T = tp + (k * n_cls + c0) * D;
      for (int64_t c = 0; c < nc; ++c) {
        tnp[k * n_cls + c0 + c] = std::max(std::sqrt(cpu::sumsq(D, T + c * D)), norm_eps);
      }
      dots(xp + k * b * D, b, T, nc, D, gp + k * b * n_cls + c0, n_cls);
    }
  });

  // 2. Per client: cosines, log-softmax, losses, norms, clip factors, weights and projections.
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ex(n_cls);
    for (int64_t k = begin; k < end; ++k) {
      const acc_t C = static_cast<acc_t>(cp[k]);
      const acc_t* tn = tnp + k * n_cls;
      acc_t* wk = wp + k * n_cls * b;
      acc_t* pk = pp + k * n_cls;
      std::fill(pk, pk + n_cls, acc_t(0));
      for (int64_t i = 0; i < b; ++i) {
        const acc_t xn = std::sqrt(cpu::sumsq(D, xp + (k * b + i) * D));
        const acc_t rx = acc_t(1) / std::max(xn, norm_eps);
        const acc_t xsq = (xn * rx) * (xn * rx);  // ||x^_i||^2: 1, or 0 for a zero feature
        acc_t* cs = gp + (k * b + i) * n_cls;
        acc_t mx = -std::numeric_limits<acc_t>::infinity();
        for (int64_t c = 0; c < n_cls; ++c) {
          cs[c] = cs[c] * rx / tn[c];
          mx = std::max(mx, s * cs[c]);
        }
        acc_t sum = 0;
        for (int64_t c = 0; c < n_cls; ++c) {
          ex[c] = std::exp(s * cs[c] - mx);
          sum += ex[c];
        }
        const int64_t y = yp[k * b + i];
        const acc_t m = mp != nullptr ? mp[k * b + i] : acc_t(1);
        const acc_t loss = -(s * cs[y] - mx - std::log(sum));
        const acc_t inv_sum = acc_t(1) / sum;
        acc_t sq = 0;
        for (int64_t c = 0; c < n_cls; ++c) {
          const acc_t w = ex[c] * inv_sum - (c == y ? acc_t(1) : acc_t(0));
          ex[c] = w;
          sq += w * w * std::max(xsq - cs[c] * cs[c], acc_t(0)) / (tn[c] * tn[c]);
        }
        const acc_t norm = s * std::sqrt(sq) * m;
        const acc_t f = std::min(C / (norm + static_cast<acc_t>(kClipEps)), acc_t(1)) * m;
        np_[k * b + i] = static_cast<float>(norm);
        lp[k * b + i] = static_cast<float>(loss * m);
        for (int64_t c = 0; c < n_cls; ++c) {
          const acc_t fw = f * ex[c];
          wk[c * b + i] = fw * rx;
          pk[c] += fw * cs[c];
        }
      }
    }
  });

  // 3. Per (client, class block): the block's normals, then the release in one pass.
  const bool noisy = noise_multiplier > 0;
  at::parallel_for(0, K * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> z(noisy ? kClassBlock * D : 0);
    acc_t alpha[kClassBlock], beta[kClassBlock];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t k = unit / blocks, c0 = (unit % blocks) * kClassBlock;
      const int64_t nc = std::min(kClassBlock, n_cls - c0);
      for (int64_t c = 0; c < nc; ++c) {
        const acc_t tn = tnp[k * n_cls + c0 + c];
        alpha[c] = static_cast<acc_t>(logit_scale / denominator) / tn;
        beta[c] = -alpha[c] * pp[k * n_cls + c0 + c] / tn;
      }
      const acc_t gamma = static_cast<acc_t>(noise_multiplier * static_cast<double>(cp[k]) / denominator);
      if (noisy) {
        // Client k: normals c0 D .. (c0 + nc) D - 1 of its own stream (seed[k], offset[k]), row-major.
        fill_normals_fast(static_cast<uint64_t>(seed[k]), static_cast<uint64_t>(offset[k]),
                          static_cast<uint64_t>(c0 * D), nc * D, z.data());
      }
      combine(nc, b, D, wp + (k * n_cls + c0) * b, xp + k * b * D, tp + (k * n_cls + c0) * D, alpha, beta,
              gamma, noisy ? z.data() : nullptr, outp + (k * n_cls + c0) * D);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dp_output_clip_noise_cpu(
    const at::Tensor& image_feats, const at::Tensor& text_feats, const at::Tensor& labels,
    const std::optional<at::Tensor>& mask, double logit_scale, const at::Tensor& clip_norm,
    double noise_multiplier, c10::IntArrayRef seed, c10::IntArrayRef offset, double denominator) {
  const OutputDpDims dims =
      check_dp_output_clip_noise(image_feats, text_feats, labels, mask, logit_scale, clip_norm,
                                 noise_multiplier, seed, offset, denominator);
  TORCH_INTERNAL_ASSERT(text_feats.device().is_cpu());
  const int64_t K = dims.K, b = dims.b, n_cls = dims.n_cls, D = dims.D;
  const auto dtype = text_feats.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = text_feats.options();
  at::Tensor norms = at::empty({K, b}, opts.dtype(at::kFloat));
  at::Tensor losses = at::empty({K, b}, opts.dtype(at::kFloat));
  // Written in op-math precision (the output itself for float32 / float64).
  at::Tensor release = at::empty({K, n_cls, D}, opts.dtype(acc));
  if (K > 0) {
    const at::Tensor x_acc = cpu::to_acc(image_feats);
    const at::Tensor t_acc = cpu::to_acc(text_feats);
    const at::Tensor mask_acc = dims.has_mask ? cpu::to_acc(*mask) : at::Tensor();
    const at::Tensor y = labels.contiguous();
    const at::Tensor c = clip_norm.contiguous();
    AT_DISPATCH_FLOATING_TYPES(acc, "dp_output_clip_noise_cpu", [&] {
      dp_output_clip_noise_kernel<scalar_t>(x_acc, t_acc, y, mask_acc, c, dims, logit_scale, noise_multiplier,
                                            seed, offset, denominator, release, norms, losses);
    });
  }
  return {acc == dtype ? release : release.to(dtype), norms, losses};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CPU, m) { m.impl("dp_output_clip_noise", &dp_output_clip_noise_cpu); }

}  // namespace fpl_fast
