// dp_output_clip_noise on the CPU: output-space per-example clipping of the logit head's cotangents + noise.
// Semantics: fpl_fast/ops/reference/dp_output_clip_noise_ref.py. Per client k, with raw features X (b, D) and
// T (n_cls, D):
//  1. G = X T^T (dot products, work units of kClassBlock classes) and ||T_c||;
//  2. per client: cos, log-softmax, losses, the closed-form cotangent norms, the clip factors f, the weights
//     Wt[c, i] = f_i w_ic / ||x_i|| (so that A = Wt X = (f w)^T X^) and proj_c = T^_c . A_c, which is
//     sum_i f_i w_ic cos_ic: no pass over D is needed for the projection;
//  3. per block of classes: the block's normals of client k's stream (float32 Box-Muller below float64, see
//     csrc/philox.h for the precision contract), then in one pass over the block
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
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "box_muller_f32.h"
#include "cpu_common.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FPL_OUTDP_X86 1
#else
#define FPL_OUTDP_X86 0
#endif

namespace fpl_fast {
namespace {

using cpu::F32Lanes;
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
// Normals: Philox4x32-10 (csrc/philox.h) for vectors of counters at once, then Box-Muller in float32
// (box_muller_f32.h: within a few float ulps of the double Box-Muller, same tail) on twice as many lanes as
// the double version would have: the double log/sincos were about half of the op's time. The float64 op
// keeps the double Box-Muller (cpu::fill_normals), whose float normals are philox_normal()'s.
// ------------------------------------------------------------------------------------------------

template <int VB>
struct Lanes {
  typedef typename NVec<uint64_t, VB>::type u;
  typedef typename NVec<uint32_t, VB / 2>::type u32h;  // one u of 32-bit values, narrowed
  static constexpr int kN = VB / 8;
};

// The 32 x 32 -> 64-bit products of Philox (u64 lanes holding 32-bit values). GCC lowers the generic u64
// multiply to vpmullq (3 uops, latency 15) under AVX-512 and to three vpmuludq under AVX2; vpmuludq alone is
// exact here. Plain inline (not always_inline) with their own target, so that they inline into the variant of
// their ISA once the generic code around them has.
struct MulGeneric {
  template <typename U>
  static FPL_ALWAYS_INLINE U mul(U a, uint64_t m) {
    return (a & 0xffffffffull) * m;  // as vpmuludq: the high half of each lane is ignored
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
  static constexpr int kNormalChains = 4;             // Philox chains interleaved (the multiply latency)
  static constexpr int kDotRows = 4, kDotCols = 4;    // dots: rows of X x rows of T per block
  static constexpr int kCombRows = 4, kCombVecs = 4;  // combine: classes x vectors of D per block
};
struct BlocksAvx2 {
  using Mul = MulAvx2;
  static constexpr int kVB = 32;
  static constexpr int kNormalChains = 4;  // 16 state registers: some spill, but 2 chains wait on latency
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
  static constexpr int kNormalChains = 2;
  static constexpr int kDotRows = 2, kDotCols = 4;
  static constexpr int kCombRows = 2, kCombVecs = 4;
};

// The low 32 bits of the lanes of a and b (u64 lanes holding 32-bit words), a's first: 2 N 32-bit lanes.
template <int VB>
FPL_ALWAYS_INLINE typename F32Lanes<VB>::u narrow_pair(typename Lanes<VB>::u a, typename Lanes<VB>::u b) {
  using H = typename Lanes<VB>::u32h;
  const H lo = __builtin_convertvector(a, H), hi = __builtin_convertvector(b, H);
  if constexpr (Lanes<VB>::kN == 8) {
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  } else if constexpr (Lanes<VB>::kN == 4) {
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
  } else {
    static_assert(Lanes<VB>::kN == 2);
    return __builtin_shufflevector(lo, hi, 0, 1, 2, 3);
  }
}

// Normals 4 q0 .. 4 (q0 + G N) - 1 of the (seed, offset) stream (G vectors of N = Lanes<VB>::kN counters, G
// even), in stream order. G independent Philox chains hide the multiply latency; Box-Muller then runs on
// pairs of chains as float vectors of 2 N lanes (the same VB bytes).
template <int VB, int G, typename Mul>
FPL_ALWAYS_INLINE void normals_chunk(uint64_t seed, uint64_t offset, uint64_t q0, float* out) {
  static_assert(G % 2 == 0);
  using U = typename Lanes<VB>::u;
  using F = typename F32Lanes<VB>::f;
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
    // The lanes' high halves are left as garbage: the multiplies read only the low 32 bits of their operands,
    // the 32-bit words are the low halves, and narrow_pair truncates (two masks fewer per chain and round).
    for (int g = 0; g < G; ++g) {
      const U p0 = Mul::mul(c0[g], kM0);  // exact 64-bit products of the low halves
      const U p1 = Mul::mul(c2[g], kM1);
      const U n0 = (p1 >> 32) ^ c1[g] ^ k0;
      const U n2 = (p0 >> 32) ^ c3[g] ^ k1;
      c1[g] = p1;
      c3[g] = p0;
      c0[g] = n0;
      c2[g] = n2;
    }
  }
  for (int g = 0; g < G; g += 2) {
    F z[4];
    cpu::box_muller_f32<VB>(narrow_pair<VB>(c0[g], c0[g + 1]), narrow_pair<VB>(c1[g], c1[g + 1]), &z[0],
                            &z[1]);
    cpu::box_muller_f32<VB>(narrow_pair<VB>(c2[g], c2[g + 1]), narrow_pair<VB>(c3[g], c3[g + 1]), &z[2],
                            &z[3]);
    float* o = out + 4 * N * g;  // counters g N .. (g + 2) N - 1: z0 z1 z2 z3 each
    // Transpose (z0 | z1 | z2 | z3) into stream order: (z0, z1) and (z2, z3) pairs as 64-bit lanes.
    if constexpr (N == 8) {
      typedef double d8 __attribute__((vector_size(64)));
      const F a = __builtin_shufflevector(z[0], z[1], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const F a2 =
          __builtin_shufflevector(z[0], z[1], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      const F b = __builtin_shufflevector(z[2], z[3], 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      const F b2 =
          __builtin_shufflevector(z[2], z[3], 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
      const d8 r[4] = {__builtin_shufflevector((d8)a, (d8)b, 0, 8, 1, 9, 2, 10, 3, 11),
                       __builtin_shufflevector((d8)a, (d8)b, 4, 12, 5, 13, 6, 14, 7, 15),
                       __builtin_shufflevector((d8)a2, (d8)b2, 0, 8, 1, 9, 2, 10, 3, 11),
                       __builtin_shufflevector((d8)a2, (d8)b2, 4, 12, 5, 13, 6, 14, 7, 15)};
      std::memcpy(o, r, sizeof(r));
    } else if constexpr (N == 4) {
      typedef double d4 __attribute__((vector_size(32)));
      const F a = __builtin_shufflevector(z[0], z[1], 0, 8, 1, 9, 2, 10, 3, 11);
      const F a2 = __builtin_shufflevector(z[0], z[1], 4, 12, 5, 13, 6, 14, 7, 15);
      const F b = __builtin_shufflevector(z[2], z[3], 0, 8, 1, 9, 2, 10, 3, 11);
      const F b2 = __builtin_shufflevector(z[2], z[3], 4, 12, 5, 13, 6, 14, 7, 15);
      const d4 r[4] = {__builtin_shufflevector((d4)a, (d4)b, 0, 4, 1, 5),
                       __builtin_shufflevector((d4)a, (d4)b, 2, 6, 3, 7),
                       __builtin_shufflevector((d4)a2, (d4)b2, 0, 4, 1, 5),
                       __builtin_shufflevector((d4)a2, (d4)b2, 2, 6, 3, 7)};
      std::memcpy(o, r, sizeof(r));
    } else {
      for (int l = 0; l < 2 * N; ++l) {
        for (int m = 0; m < 4; ++m) o[4 * l + m] = z[m][l];
      }
    }
  }
}

// Normals start .. start + count - 1 of the (seed, offset) stream, as float: float32 Box-Muller in the vector
// chunks, the scalar double one (philox_normal) for the unaligned head and the tail.
template <typename B>
FPL_ALWAYS_INLINE void fill_normals_fast_body(uint64_t seed, uint64_t offset, uint64_t start, int64_t count,
                                              float* out) {
  constexpr int kGroups = B::kNormalChains;
  constexpr int64_t kChunk = 4 * kGroups * Lanes<B::kVB>::kN;
  int64_t j = 0;
  for (; j < count && (start + j) % 4 != 0; ++j) out[j] = philox_normal(seed, offset, start + j);
  for (; j + kChunk <= count; j += kChunk)
    normals_chunk<B::kVB, kGroups, typename B::Mul>(seed, offset, (start + j) / 4, out + j);
  for (; j + 4 <= count; j += 4) philox_normal4(seed, offset, (start + j) / 4, out + j);
  for (; j < count; ++j) out[j] = philox_normal(seed, offset, start + j);
}

// The float32 Box-Muller on n given word pairs wp[2 i], wp[2 i + 1] (uint32 in int64), to op[2 i], op[2 i +
// 1].
template <typename B>
FPL_ALWAYS_INLINE void box_muller_words_body(const int64_t* wp, int64_t n, float* op) {
  using F = typename F32Lanes<B::kVB>::f;
  using U = typename F32Lanes<B::kVB>::u;
  constexpr int64_t kL = sizeof(F) / sizeof(float);
  for (int64_t i0 = 0; i0 < n; i0 += kL) {
    U a{}, b{};
    for (int64_t l = 0; l < kL && i0 + l < n; ++l) {
      a[l] = static_cast<uint32_t>(wp[2 * (i0 + l)]);
      b[l] = static_cast<uint32_t>(wp[2 * (i0 + l) + 1]);
    }
    F z0, z1;
    cpu::box_muller_f32<B::kVB>(a, b, &z0, &z1);
    for (int64_t l = 0; l < kL && i0 + l < n; ++l) {
      op[2 * (i0 + l)] = z0[l];
      op[2 * (i0 + l) + 1] = z1[l];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Small dense products, register-blocked.
// ------------------------------------------------------------------------------------------------
// Lane l of the result = the sum of the lanes of v[l], for W vectors of W lanes: log2 W levels, each adding
// the two halves of pairs of vectors (v[p], v[p + n/2]) shuffled side by side; a fixed order.
template <int W, int H, int J>
inline constexpr int kTreeLo = (J / (2 * H)) * 2 * H + ((J / H) % 2) * W + J % H;
template <typename V, int W, int H, size_t... J>
FPL_ALWAYS_INLINE V tree_pair_add(V a, V b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, kTreeLo<W, H, J>...) +
         __builtin_shufflevector(a, b, (kTreeLo<W, H, J> + H)...);
}
template <typename V, int W>
FPL_ALWAYS_INLINE V tree_lane_sums(V* v) {
  int n = W;
  [&]<size_t... H>(std::index_sequence<H...>) {
    (([&] {
       constexpr int h = W >> (H + 1);
       n /= 2;
       for (int p = 0; p < n; ++p)
         v[p] = tree_pair_add<V, W, h>(v[p], v[p + n], std::make_index_sequence<W>{});
     }()),
     ...);
  }(std::make_index_sequence<__builtin_ctz(W)>{});
  return v[0];
}

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
  T sums[RM][RN];
  if constexpr ((RM * RN) % W == 0) {
    // Lane sums by a shuffle tree over W accumulators at a time (the serial per-accumulator sums cost about
    // as much as the products at D = 512).
    for (int p = 0; p < RM * RN; p += W) {
      V v[W];
      for (int l = 0; l < W; ++l) v[l] = acc[(p + l) / RN][(p + l) % RN];
      const V tot = tree_lane_sums<V, W>(v);
      for (int l = 0; l < W; ++l) sums[(p + l) / RN][(p + l) % RN] = tot[l];
    }
  } else {
    for (int a = 0; a < RM; ++a) {
      for (int c = 0; c < RN; ++c) {
        T s = 0;
        for (int64_t l = 0; l < W; ++l) s += acc[a][c][l];
        sums[a][c] = s;
      }
    }
  }
  for (int a = 0; a < RM; ++a) {
    for (int c = 0; c < RN; ++c) {
      T s = sums[a][c];
      const T* x = X + (i0 + a) * len;
      const T* y = Y + (j0 + c) * len;
      for (int64_t e = main; e < len; ++e) s += x[e] * y[e];
      G[(i0 + a) * ldg + j0 + c] = s;
    }
  }
}

// out[i] = ||X_i||^2 for the m rows of X (length len): W rows at a time, one accumulator each, summed by the
// tree (a serial horizontal sum per row cost as much as the squares).
template <typename B, typename T>
FPL_ALWAYS_INLINE void sumsq_rows_body(const T* X, int64_t m, int64_t len, T* out) {
  using V = typename NVec<T, B::kVB>::type;
  constexpr int W = static_cast<int>(NVec<T, B::kVB>::kLanes);
  const int64_t main = len - len % W;
  for (int64_t r0 = 0; r0 < m; r0 += W) {
    const int nr = static_cast<int>(std::min<int64_t>(W, m - r0));
    V acc[W] = {};
    for (int64_t e = 0; e < main; e += W) {
      for (int l = 0; l < nr; ++l) {
        const V v = nload<V>(X + (r0 + l) * len + e);
        acc[l] += v * v;
      }
    }
    const V tot = tree_lane_sums<V, W>(acc);
    for (int l = 0; l < nr; ++l) {
      T s = tot[l];
      const T* x = X + (r0 + l) * len;
      for (int64_t e = main; e < len; ++e) s += x[e] * x[e];
      out[r0 + l] = s;
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

// Per-ISA variants with their own blocking (cpu_common.h's ISA switch around name##_body<Blocks...>).
#define FPL_BLOCKED_VARIANTS(ret, name, params, args)                                               \
  FPL_CPU_ISA_VARIANTS(ret, name, params, args, name##_body<BlocksAvx512>, name##_body<BlocksAvx2>, \
                       name##_body<BlocksDefault>)

FPL_BLOCKED_VARIANTS(void, fill_normals_fast,
                     (uint64_t seed, uint64_t offset, uint64_t start, int64_t count, float* out),
                     (seed, offset, start, count, out))
FPL_BLOCKED_VARIANTS(void, box_muller_words, (const int64_t* wp, int64_t n, float* op), (wp, n, op))
FPL_BLOCKED_VARIANTS(void, sumsq_rows, (const float* X, int64_t m, int64_t len, float* out), (X, m, len, out))
FPL_BLOCKED_VARIANTS(void, sumsq_rows, (const double* X, int64_t m, int64_t len, double* out),
                     (X, m, len, out))
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
      acc_t* tn = tnp + k * n_cls + c0;
      sumsq_rows(T, nc, D, tn);
      for (int64_t c = 0; c < nc; ++c) tn[c] = std::max(std::sqrt(tn[c]), norm_eps);
      dots(xp + k * b * D, b, T, nc, D, gp + k * b * n_cls + c0, n_cls);
    }
  });

  // 2. Per client: cosines, log-softmax, losses, norms, clip factors, weights and projections.
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ex(n_cls), xsq_k(b);
    for (int64_t k = begin; k < end; ++k) {
      sumsq_rows(xp + k * b * D, b, D, xsq_k.data());
      const acc_t C = static_cast<acc_t>(cp[k]);
      const acc_t* tn = tnp + k * n_cls;
      acc_t* wk = wp + k * n_cls * b;
      acc_t* pk = pp + k * n_cls;
      std::fill(pk, pk + n_cls, acc_t(0));
      for (int64_t i = 0; i < b; ++i) {
        const acc_t xn = std::sqrt(xsq_k[i]);
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
        const uint64_t sk = static_cast<uint64_t>(seed[k]), ok = static_cast<uint64_t>(offset[k]);
        if constexpr (std::is_same_v<acc_t, double>) {
          cpu::fill_normals(sk, ok, static_cast<uint64_t>(c0 * D), nc * D, z.data());
        } else {
          fill_normals_fast(sk, ok, static_cast<uint64_t>(c0 * D), nc * D, z.data());
        }
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
      check_dp_output_clip_noise(image_feats, text_feats, labels, mask, clip_norm, seed, offset);
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

// Test hook: the float32 Box-Muller (the vector path of fill_normals_fast, same ISA variant) on given Philox
// words, so that tests can reach the extreme words (x0 near 0 and 2^32) no affordable seed search would.
// words: (n, 2) int64 holding uint32 (x0, x1); returns (n, 2) float32 (z0, z1).
at::Tensor box_muller_f32_words_cpu(const at::Tensor& words) {
  const detail::ArgChecks check("_box_muller_f32_words");
  check.shape(words.dim() == 2 && words.size(1) == 2, words, "words");
  check.dtype(words, "words", at::kLong);
  const at::Tensor w = words.contiguous();
  const int64_t n = w.size(0);
  at::Tensor out = at::empty({n, 2}, w.options().dtype(at::kFloat));
  const int64_t* wp = w.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  box_muller_words(wp, n, op);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fpl_fast, m) { m.def("_box_muller_f32_words(Tensor words) -> Tensor"); }

TORCH_LIBRARY_IMPL(fpl_fast, CPU, m) {
  m.impl("dp_output_clip_noise", &dp_output_clip_noise_cpu);
  m.impl("_box_muller_f32_words", &box_muller_f32_words_cpu);
}

}  // namespace fpl_fast
