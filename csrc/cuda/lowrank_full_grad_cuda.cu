// lowrank_full_grad on CUDA: g_L = scale (g_U V + U g_V + U U^T g_U V). Semantics:
// fpl_fast/ops/reference/lowrank_full_grad_ref.py.
//
// Computed as g_L = scale ((g_U + U (U^T g_U)) V + U g_V), in two launches in op-math precision:
//  1. inner kernel, a thread per (k, t, j): W[t, j] = g_U[t, j] + sum_j' U[t, j'] (U^T g_U)[j', j];
//  2. main kernel, a thread per output (k, t, col): scale sum_j (W[t, j] V[j, col] + U[t, j] g_V[j, col]).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../checks.h"
#include "cuda_utils.cuh"

namespace fpl_fast {
namespace {

using cuda::ceil_div;

constexpr int kThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lowrank_full_grad_inner_kernel(acc_t* __restrict__ w,                // (K, n_ctx, r)
                                   const scalar_t* __restrict__ grad_u,  // (K, n_ctx, r)
                                   const scalar_t* __restrict__ u,       // (K, n_ctx, r)
                                   int64_t K, int64_t n_ctx, int64_t r) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= K * n_ctx * r) return;
  const int64_t k = e / (n_ctx * r);
  const int64_t t = (e / r) % n_ctx;
  const int64_t j = e % r;
  const scalar_t* u_k = u + k * n_ctx * r;
  const scalar_t* gu_k = grad_u + k * n_ctx * r;
  acc_t val = static_cast<acc_t>(gu_k[t * r + j]);
  for (int64_t jp = 0; jp < r; ++jp) {
    acc_t m = 0;  // (U^T g_U)[jp, j]
    for (int64_t tp = 0; tp < n_ctx; ++tp) {
      m += static_cast<acc_t>(u_k[tp * r + jp]) * static_cast<acc_t>(gu_k[tp * r + j]);
    }
    val += static_cast<acc_t>(u_k[t * r + jp]) * m;
  }
  w[e] = val;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lowrank_full_grad_kernel(scalar_t* __restrict__ out,           // (K, n_ctx, d)
                             const acc_t* __restrict__ w,          // (K, n_ctx, r)
                             const scalar_t* __restrict__ u,       // (K, n_ctx, r)
                             const scalar_t* __restrict__ v,       // (K, r, d)
                             const scalar_t* __restrict__ grad_v,  // (K, r, d)
                             int64_t K, int64_t n_ctx, int64_t d, int64_t r, acc_t scale) {
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= K * n_ctx * d) return;
  const int64_t k = e / (n_ctx * d);
  const int64_t t = (e / d) % n_ctx;
  const int64_t col = e % d;
  const acc_t* w_row = w + (k * n_ctx + t) * r;
  const scalar_t* u_row = u + (k * n_ctx + t) * r;
  const scalar_t* v_col = v + k * r * d + col;
  const scalar_t* gv_col = grad_v + k * r * d + col;
  acc_t s = 0;
  for (int64_t j = 0; j < r; ++j) {
    s += w_row[j] * static_cast<acc_t>(v_col[j * d]) +
         static_cast<acc_t>(u_row[j]) * static_cast<acc_t>(gv_col[j * d]);
  }
  out[e] = static_cast<scalar_t>(scale * s);
}

at::Tensor lowrank_full_grad_cuda(const at::Tensor& grad_u_in, const at::Tensor& grad_v_in,
                                  const at::Tensor& u_in, const at::Tensor& v_in, double scale) {
  const FullGradDims dims = check_lowrank_full_grad(grad_u_in, grad_v_in, u_in, v_in);
  detail::ArgChecks("lowrank_full_grad").cuda(u_in, "u");
  // grad_u, grad_v and v are checked to be on u's device.
  const c10::cuda::CUDAGuard device_guard(u_in.device());
  const at::Tensor grad_u = grad_u_in.contiguous();
  const at::Tensor grad_v = grad_v_in.contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor v = v_in.contiguous();
  const int64_t K = dims.K, n_ctx = dims.n_ctx, d = dims.d, r = dims.r;
  std::vector<int64_t> sizes = {n_ctx, d};
  if (dims.batched) sizes.insert(sizes.begin(), K);
  at::Tensor out = at::empty(sizes, u.options());
  if (out.numel() == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "lowrank_full_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor w = at::empty({K, n_ctx, r}, u.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (w.numel() > 0) {
      lowrank_full_grad_inner_kernel<scalar_t, acc_t>
          <<<cuda::grid_1d(ceil_div(w.numel(), kThreads)), kThreads, 0, stream>>>(
              w.data_ptr<acc_t>(), grad_u.data_ptr<scalar_t>(), u.data_ptr<scalar_t>(), K, n_ctx, r);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    lowrank_full_grad_kernel<scalar_t, acc_t>
        <<<cuda::grid_1d(ceil_div(out.numel(), kThreads)), kThreads, 0, stream>>>(
            out.data_ptr<scalar_t>(), w.numel() > 0 ? w.data_ptr<acc_t>() : nullptr, u.data_ptr<scalar_t>(),
            v.data_ptr<scalar_t>(), grad_v.data_ptr<scalar_t>(), K, n_ctx, d, r, static_cast<acc_t>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CUDA, m) { m.impl("lowrank_full_grad", &lowrank_full_grad_cuda); }

}  // namespace fpl_fast
