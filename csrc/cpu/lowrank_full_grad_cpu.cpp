// lowrank_full_grad on the CPU: g_L = scale (g_U V + U g_V + U U^T g_U V). Semantics:
// fpl_fast/ops/reference/lowrank_full_grad_ref.py. Per client, M = g_U + U (U^T g_U) (n_ctx x r) is formed
// first, so that g_L = scale (M V + U g_V) is one pass of 2 r row updates over the (n_ctx x d) output,
// accumulated in float (double for double inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "cpu_common.h"

namespace fpl_fast {
namespace {

template <typename scalar_t>
void lowrank_full_grad_kernel(const at::Tensor& gu_acc, const at::Tensor& gv_acc, const at::Tensor& u_acc,
                              const at::Tensor& v_acc, double scale, const FullGradDims& dims,
                              at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = dims.K, n = dims.n_ctx, r = dims.r, d = dims.d;
  const acc_t* gup = gu_acc.data_ptr<acc_t>();
  const acc_t* gvp = gv_acc.data_ptr<acc_t>();
  const acc_t* up = u_acc.data_ptr<acc_t>();
  const acc_t* vp = v_acc.data_ptr<acc_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const acc_t s = static_cast<acc_t>(scale);
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> inner(r * r), m(n * r), row(d);
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* gu = gup + k * n * r;
      const acc_t* gv = gvp + k * r * d;
      const acc_t* u = up + k * n * r;
      const acc_t* v = vp + k * r * d;
      cpu::mm_tn(u, gu, inner.data(), r, n, r);        // U^T g_U (r, r)
      cpu::mm_nn(u, inner.data(), m.data(), n, r, r);  // U U^T g_U (n, r)
      for (int64_t e = 0; e < n * r; ++e) m[e] += gu[e];
      for (int64_t i = 0; i < n; ++i) {
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t j = 0; j < r; ++j) {
          cpu::axpy(d, m[i * r + j], v + j * d, row.data());
          cpu::axpy(d, u[i * r + j], gv + j * d, row.data());
        }
        scalar_t* dst = op + (k * n + i) * d;
        for (int64_t t = 0; t < d; ++t) dst[t] = static_cast<scalar_t>(s * row[t]);
      }
    }
  });
}

at::Tensor lowrank_full_grad_cpu(const at::Tensor& grad_u, const at::Tensor& grad_v, const at::Tensor& u,
                                 const at::Tensor& v, double scale) {
  const FullGradDims dims = check_lowrank_full_grad(grad_u, grad_v, u, v);
  TORCH_INTERNAL_ASSERT(u.device().is_cpu());
  at::Tensor out = at::empty(cpu::with_k(dims.batched, dims.K, {dims.n_ctx, dims.d}), u.options());
  if (out.numel() == 0) return out;
  const at::Tensor gu = cpu::to_acc(grad_u), gv = cpu::to_acc(grad_v), ua = cpu::to_acc(u),
                   va = cpu::to_acc(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lowrank_full_grad_cpu", [&] {
    lowrank_full_grad_kernel<scalar_t>(gu, gv, ua, va, scale, dims, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CPU, m) { m.impl("lowrank_full_grad", &lowrank_full_grad_cpu); }

}  // namespace fpl_fast
