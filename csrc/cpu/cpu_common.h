// Helpers shared by the CPU kernels: per-ISA variants of the hot loops, the Philox noise fill, small dense
// products.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "../philox.h"
#include "cpu_isa.h"

// The hot loops are compiled for AVX-512 and AVX2 (+FMA) next to the baseline, and each call runs the variant
// of the level chosen at load (cpu_isa.h: FPL_FAST_CPU_ISA / ATEN_CPU_CAPABILITY, else the best the CPU has),
// so the wheel stays portable without -march=native and every variant can be tested on one machine.
// FPL_CPU_VARIANTS(ret, name, (params), (args)) defines name##_avx512, name##_avx2, name##_default around the
// always-inline name##_body and the dispatching name; without FPL_CPU_MULTI_ISA only the plain name.
#if FPL_CPU_MULTI_ISA
#define FPL_CPU_VARIANTS(ret, name, params, args)                                                        \
  __attribute__((target("arch=x86-64-v4"))) static ret name##_avx512 params { return name##_body args; } \
  __attribute__((target("arch=x86-64-v3"))) static ret name##_avx2 params { return name##_body args; }   \
  static ret name##_default params { return name##_body args; }                                          \
  [[maybe_unused]] static ret name params {                                                              \
    switch (::fpl_fast::cpu::cpu_isa()) {                                                                \
      case ::fpl_fast::cpu::CpuIsa::kAvx512:                                                             \
        return name##_avx512 args;                                                                       \
      case ::fpl_fast::cpu::CpuIsa::kAvx2:                                                               \
        return name##_avx2 args;                                                                         \
      default:                                                                                           \
        return name##_default args;                                                                      \
    }                                                                                                    \
  }
#else
#define FPL_CPU_VARIANTS(ret, name, params, args) \
  [[maybe_unused]] static ret name params { return name##_body args; }
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FPL_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define FPL_ALWAYS_INLINE inline
#endif

namespace fpl_fast {
namespace cpu {

// Normals start .. start + count - 1 of the (seed, offset) stream (csrc/philox.h), as float.
inline void fill_normals(uint64_t seed, uint64_t offset, uint64_t start, int64_t count, float* out) {
  int64_t j = 0;
  for (; j < count && (start + j) % 4 != 0; ++j) out[j] = philox_normal(seed, offset, start + j);
  for (; j + 4 <= count; j += 4) philox_normal4(seed, offset, (start + j) / 4, out + j);
  for (; j < count; ++j) out[j] = philox_normal(seed, offset, start + j);
}

// 512-bit vectors through the GCC/Clang vector extension: explicit SIMD that each ISA variant lowers to its
// own registers (one zmm, two ymm or four xmm), with unaligned loads and stores through memcpy.
template <typename T>
struct Vec {
  static constexpr int64_t kLanes = 64 / sizeof(T);
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using vec_t = typename Vec<T>::type;

template <typename T>
FPL_ALWAYS_INLINE vec_t<T> vload(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
FPL_ALWAYS_INLINE void vstore(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename T>
FPL_ALWAYS_INLINE T hsum(vec_t<T> v) {
  T s = 0;
  for (int64_t l = 0; l < Vec<T>::kLanes; ++l) s += v[l];
  return s;
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

// Per-sample factor gradients: A (n x r) = X V^T, B (r x d) = U^T X; returns sum(X^2).
// X (n x d), U (n x r), V (r x d), all row-major. Rows of X are taken four at a time so that each pass over a
// row of V and of B serves four rows of X.
template <typename T>
FPL_ALWAYS_INLINE T sample_factors_body(const T* X, const T* U, const T* V, int64_t n, int64_t d, int64_t r,
                                        T* A, T* B) {
  using V_t = vec_t<T>;
  constexpr int64_t W = Vec<T>::kLanes;
  const int64_t d_main = d - d % W;
  std::memset(B, 0, sizeof(T) * r * d);
  const T total_sq = sumsq_body<T>(n * d, X);
  int64_t i0 = 0;
  for (; i0 + 4 <= n; i0 += 4) {
    const T* x0 = X + (i0 + 0) * d;
    const T* x1 = X + (i0 + 1) * d;
    const T* x2 = X + (i0 + 2) * d;
    const T* x3 = X + (i0 + 3) * d;
    for (int64_t j = 0; j < r; ++j) {
      const T* vj = V + j * d;
      T* bj = B + j * d;
      const T u0 = U[(i0 + 0) * r + j], u1 = U[(i0 + 1) * r + j];
      const T u2 = U[(i0 + 2) * r + j], u3 = U[(i0 + 3) * r + j];
      V_t s0 = {}, s1 = {}, s2 = {}, s3 = {};
      for (int64_t t = 0; t < d_main; t += W) {
        const V_t a0 = vload(x0 + t), a1 = vload(x1 + t), a2 = vload(x2 + t), a3 = vload(x3 + t);
        const V_t vv = vload(vj + t);
        s0 += a0 * vv;
        s1 += a1 * vv;
        s2 += a2 * vv;
        s3 += a3 * vv;
        vstore(bj + t, vload(bj + t) + (u0 * a0 + u1 * a1 + u2 * a2 + u3 * a3));
      }
      T h0 = hsum<T>(s0), h1 = hsum<T>(s1), h2 = hsum<T>(s2), h3 = hsum<T>(s3);
      for (int64_t t = d_main; t < d; ++t) {
        h0 += x0[t] * vj[t];
        h1 += x1[t] * vj[t];
        h2 += x2[t] * vj[t];
        h3 += x3[t] * vj[t];
        bj[t] += u0 * x0[t] + u1 * x1[t] + u2 * x2[t] + u3 * x3[t];
      }
      A[(i0 + 0) * r + j] = h0;
      A[(i0 + 1) * r + j] = h1;
      A[(i0 + 2) * r + j] = h2;
      A[(i0 + 3) * r + j] = h3;
    }
  }
  for (; i0 < n; ++i0) {
    const T* x0 = X + i0 * d;
    for (int64_t j = 0; j < r; ++j) {
      const T* vj = V + j * d;
      T* bj = B + j * d;
      const T u0 = U[i0 * r + j];
      V_t s0 = {};
      for (int64_t t = 0; t < d_main; t += W) {
        const V_t a0 = vload(x0 + t);
        s0 += a0 * vload(vj + t);
        vstore(bj + t, vload(bj + t) + u0 * a0);
      }
      T h0 = hsum<T>(s0);
      for (int64_t t = d_main; t < d; ++t) {
        h0 += x0[t] * vj[t];
        bj[t] += u0 * x0[t];
      }
      A[i0 * r + j] = h0;
    }
  }
  return total_sq;
}

FPL_CPU_VARIANTS(float, sample_factors,
                 (const float* X, const float* U, const float* V, int64_t n, int64_t d, int64_t r, float* A,
                  float* B),
                 (X, U, V, n, d, r, A, B))
FPL_CPU_VARIANTS(double, sample_factors,
                 (const double* X, const double* U, const double* V, int64_t n, int64_t d, int64_t r,
                  double* A, double* B),
                 (X, U, V, n, d, r, A, B))

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
