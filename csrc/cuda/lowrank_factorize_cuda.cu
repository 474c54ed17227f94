// lowrank_factorize on CUDA: one randomised power iteration L ~ U V, R = L - U V.
// Semantics: fpl_fast/ops/reference/lowrank_factorize_ref.py.
//
// One block per client, in op-math precision, with the intermediates in a small global scratch (L1/L2
// resident, visible within the block across __syncthreads): V0 (d x r) from client k's own Philox stream
// (seed[k], offset[k]) (normal = row-major index), Y = L V0, U = orth(Y), W = L^T U, W = orth(W); then U, V =
// W^T and R = L - U V are written out. orth is the reference's column-wise modified Gram-Schmidt: normalise
// column j, remove its component from every later column, for j = 0 .. r - 1.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "cuda_utils.cuh"

namespace fpl_fast {
namespace {

using cuda::kWarpSize;

constexpr int kThreads = 256;

// Column-wise modified Gram-Schmidt of m (n x r, row-major) by the whole block, as reference._gram_schmidt.
template <typename acc_t>
__device__ void gram_schmidt(acc_t* m, int64_t n, int64_t r, acc_t* red) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  for (int64_t j = 0; j < r; ++j) {
    acc_t ss[1] = {acc_t(0)};
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss[0] += m[i * r + j] * m[i * r + j];
    cuda::block_sum<acc_t, 1>(ss, red);
    const acc_t denom = sqrt(ss[0]) + static_cast<acc_t>(kGsEps);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m[i * r + j] = m[i * r + j] / denom;
    __syncthreads();
    // Warp w owns the later columns j + 1 + w, j + 1 + w + n_warps, ...: dot with column j, then subtract.
    for (int64_t j2 = j + 1 + warp; j2 < r; j2 += n_warps) {
      acc_t dot = 0;
      for (int64_t i = lane; i < n; i += kWarpSize) dot += m[i * r + j] * m[i * r + j2];
      dot = cuda::warp_sum(dot);
      for (int64_t i = lane; i < n; i += kWarpSize) m[i * r + j2] -= dot * m[i * r + j];
    }
    __syncthreads();
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    lowrank_factorize_kernel(const scalar_t* __restrict__ l,  // (K, n, d)
                             acc_t* w_scratch,                // (K, d, r): V0, then W = L^T U, then orth(W)
                             acc_t* y_scratch,                // (K, n, r): L V0, then U = orth(L V0)
                             scalar_t* __restrict__ u_out,    // (K, n, r)
                             scalar_t* __restrict__ v_out,    // (K, r, d)
                             scalar_t* __restrict__ res_out,  // (K, n, d)
                             int64_t n, int64_t d, int64_t r, cuda::StreamPtrs streams) {
  __shared__ acc_t red[kWarpSize];
  const int64_t k = blockIdx.x;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  const scalar_t* l_k = l + k * n * d;
  acc_t* w = w_scratch + k * d * r;
  acc_t* y = y_scratch + k * n * r;

  // V0 (d, r): element e = row * r + col is normal e of client k's stream.
  const uint64_t seed = streams.seed[k], offset = streams.offset[k];
  for (int64_t e = threadIdx.x; e < d * r; e += blockDim.x) {
    w[e] = static_cast<acc_t>(philox_normal(seed, offset, static_cast<uint64_t>(e)));
  }
  __syncthreads();

  // Y = L V0 (n, r): warp per output (t, j), lanes over d.
  for (int64_t p = warp; p < n * r; p += n_warps) {
    const int64_t t = p / r;
    const int64_t j = p % r;
    acc_t s = 0;
    for (int64_t col = lane; col < d; col += kWarpSize)
      s += static_cast<acc_t>(l_k[t * d + col]) * w[col * r + j];
    s = cuda::warp_sum(s);
    if (lane == 0) y[p] = s;
  }
  __syncthreads();

  gram_schmidt(y, n, r, red);  // y = U

  // W = L^T U (d, r), overwriting V0 (no longer read: Y is complete).
  for (int64_t e = threadIdx.x; e < d * r; e += blockDim.x) {
    const int64_t col = e / r;
    const int64_t j = e % r;
    acc_t s = 0;
    for (int64_t t = 0; t < n; ++t) s += static_cast<acc_t>(l_k[t * d + col]) * y[t * r + j];
    w[e] = s;
  }
  __syncthreads();

  gram_schmidt(w, d, r, red);  // w = orth(L^T U) = V^T

  for (int64_t e = threadIdx.x; e < n * r; e += blockDim.x)
    u_out[k * n * r + e] = static_cast<scalar_t>(y[e]);
  for (int64_t e = threadIdx.x; e < r * d; e += blockDim.x) {
    const int64_t j = e / d;
    const int64_t col = e % d;
    v_out[k * r * d + e] = static_cast<scalar_t>(w[col * r + j]);
  }
  // R = L - U V, with the unrounded U and V as the reference.
  for (int64_t e = threadIdx.x; e < n * d; e += blockDim.x) {
    const int64_t t = e / d;
    const int64_t col = e % d;
    acc_t uv = 0;
    for (int64_t j = 0; j < r; ++j) uv += y[t * r + j] * w[col * r + j];
    res_out[k * n * d + e] = static_cast<scalar_t>(static_cast<acc_t>(l_k[e]) - uv);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_factorize_cuda(const at::Tensor& l_in, int64_t rank,
                                                                      c10::IntArrayRef seed,
                                                                      c10::IntArrayRef offset) {
  const FactorizeDims dims = check_lowrank_factorize(l_in, rank, seed, offset);
  detail::ArgChecks("lowrank_factorize").cuda(l_in, "l");
  const c10::cuda::CUDAGuard device_guard(l_in.device());
  const at::Tensor l = l_in.contiguous();
  const int64_t K = dims.K, n = dims.n_ctx, d = dims.d, r = dims.r;
  auto with_k = [&](std::vector<int64_t> sizes) {
    if (dims.batched) sizes.insert(sizes.begin(), K);
    return sizes;
  };
  at::Tensor u = at::empty(with_k({n, r}), l.options());
  at::Tensor v = at::empty(with_k({r, d}), l.options());
  at::Tensor res = at::empty(with_k({n, d}), l.options());
  if (K == 0) return {u, v, res};  // rank >= 1 implies n, d >= 1
  const at::Tensor streams = cuda::streams_on_device(seed, offset, l.device());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "lowrank_factorize_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = l.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    at::Tensor w_scratch = at::empty({K, d, r}, acc_opts);
    at::Tensor y_scratch = at::empty({K, n, r}, acc_opts);
    lowrank_factorize_kernel<scalar_t, acc_t>
        <<<cuda::grid_1d(K), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            l.data_ptr<scalar_t>(), w_scratch.data_ptr<acc_t>(), y_scratch.data_ptr<acc_t>(),
            u.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), res.data_ptr<scalar_t>(), n, d, r,
            cuda::stream_ptrs(streams));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {u, v, res};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CUDA, m) { m.impl("lowrank_factorize", &lowrank_factorize_cuda); }

}  // namespace fpl_fast
