// lowrank_factorize on the CPU: one randomised power iteration per client. Semantics:
// fpl_fast/ops/reference/lowrank_factorize_ref.py. V0 (d x r) comes from the client's own Philox stream, U =
// orth(L V0), W = orth(L^T U), V = W^T, R = L - U V, where orth is the reference's column-wise modified
// Gram-Schmidt (normalise column j, remove it from the later columns). W is kept transposed (r x d) so its
// columns are contiguous rows and V needs no transpose.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "cpu_common.h"

namespace fpl_fast {
namespace {

// Gram-Schmidt over r vectors of length len, vector j at m + j * stride_vec, elements stride_elem apart.
template <typename T>
void gram_schmidt(T* m, int64_t r, int64_t len, int64_t stride_vec, int64_t stride_elem) {
  auto at_ = [&](int64_t j, int64_t e) -> T& { return m[j * stride_vec + e * stride_elem]; };
  for (int64_t j = 0; j < r; ++j) {
    T sq = 0;
    for (int64_t e = 0; e < len; ++e) sq += at_(j, e) * at_(j, e);
    const T denom = std::sqrt(sq) + static_cast<T>(kGsEps);
    for (int64_t e = 0; e < len; ++e) at_(j, e) = at_(j, e) / denom;
    for (int64_t q = j + 1; q < r; ++q) {
      T proj = 0;
      for (int64_t e = 0; e < len; ++e) proj += at_(j, e) * at_(q, e);
      for (int64_t e = 0; e < len; ++e) at_(q, e) -= proj * at_(j, e);
    }
  }
}

template <typename scalar_t>
void lowrank_factorize_kernel(const at::Tensor& l, const FactorizeDims& dims, c10::IntArrayRef seed,
                              c10::IntArrayRef offset, at::Tensor& out_u, at::Tensor& out_v,
                              at::Tensor& out_r) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = dims.K, n = dims.n_ctx, d = dims.d, r = dims.r;
  const scalar_t* lp = l.data_ptr<scalar_t>();
  scalar_t* uo = out_u.data_ptr<scalar_t>();
  scalar_t* vo = out_v.data_ptr<scalar_t>();
  scalar_t* ro = out_r.data_ptr<scalar_t>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(n * d), v0t(r * d), u(n * r), wt(r * d), row(d);
    std::vector<float> z(d * r);
    for (int64_t k = begin; k < end; ++k) {
      cpu::load_acc(n * d, lp + k * n * d, x.data(), false);
      // V0 (d, r) row-major: normals 0 .. d r - 1 of client k's stream (seed[k], offset[k]); stored
      // transposed.
      cpu::fill_normals(static_cast<uint64_t>(seed[k]), static_cast<uint64_t>(offset[k]), 0, d * r, z.data());
      for (int64_t t = 0; t < d; ++t) {
        for (int64_t j = 0; j < r; ++j) v0t[j * d + t] = static_cast<acc_t>(z[t * r + j]);
      }
      cpu::mm_nt(x.data(), v0t.data(), u.data(), n, d, r);  // L V0 (n, r)
      gram_schmidt(u.data(), r, n, 1, r);                   // columns of (n, r)
      cpu::mm_tn(u.data(), x.data(), wt.data(), r, n, d);   // (L^T U)^T = U^T L (r, d)
      gram_schmidt(wt.data(), r, d, d, 1);                  // columns of W = rows of W^T
      for (int64_t i = 0; i < n; ++i) {
        const acc_t* xi = x.data() + i * d;
        for (int64_t t = 0; t < d; ++t) row[t] = 0;
        for (int64_t j = 0; j < r; ++j) cpu::axpy(d, u[i * r + j], wt.data() + j * d, row.data());
        scalar_t* dst = ro + (k * n + i) * d;
        for (int64_t t = 0; t < d; ++t) dst[t] = static_cast<scalar_t>(xi[t] - row[t]);
      }
      for (int64_t e = 0; e < n * r; ++e) uo[k * n * r + e] = static_cast<scalar_t>(u[e]);
      for (int64_t e = 0; e < r * d; ++e) vo[k * r * d + e] = static_cast<scalar_t>(wt[e]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_factorize_cpu(const at::Tensor& l, int64_t rank,
                                                                     c10::IntArrayRef seed,
                                                                     c10::IntArrayRef offset) {
  const FactorizeDims dims = check_lowrank_factorize(l, rank, seed, offset);
  TORCH_INTERNAL_ASSERT(l.device().is_cpu());
  const auto opts = l.options();
  at::Tensor out_u = at::empty(cpu::with_k(dims.batched, dims.K, {dims.n_ctx, dims.r}), opts);
  at::Tensor out_v = at::empty(cpu::with_k(dims.batched, dims.K, {dims.r, dims.d}), opts);
  at::Tensor out_r = at::empty(cpu::with_k(dims.batched, dims.K, {dims.n_ctx, dims.d}), opts);
  if (dims.K == 0) return {out_u, out_v, out_r};
  const at::Tensor x = l.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowrank_factorize_cpu", [&] {
    lowrank_factorize_kernel<scalar_t>(x, dims, seed, offset, out_u, out_v, out_r);
  });
  return {out_u, out_v, out_r};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CPU, m) { m.impl("lowrank_factorize", &lowrank_factorize_cpu); }

}  // namespace fpl_fast
