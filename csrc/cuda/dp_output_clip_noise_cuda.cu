// dp_output_clip_noise on CUDA: output-space per-example clipping of the logit head's cotangents + noise.
// Semantics: fpl_fast/ops/reference/dp_output_clip_noise_ref.py; the closed form as the CPU kernel
// (csrc/cpu/dp_output_clip_noise_cpu.cpp).
//
// Three launches; no (b, n_cls, D) cotangent and no (n_cls, D) temporary is ever written:
//  1. row norms, a warp per row: max(||T_c||, eps) and max(||x_i||, eps);
//  2. example kernel, one block per example (k, i): the warps form cos_ic = x_i . T_c / (||x_i|| ||T_c||)
//     (a warp per class), then warp 0 the log-softmax, the loss, the closed-form norm and the clip factor
//     f_i, and writes Wt[k, c, i] = f_i w_ic / ||x_i|| and P[k, i, c] = f_i w_ic cos_ic;
//  3. release kernel, one block per class (k, c): proj_c = sum_i P[k, i, c], then a thread per column e forms
//     A_c[e] = sum_i Wt[k, c, i] x_i[e] and writes s / (||T_c|| denom) (A_c - proj_c T_c / ||T_c||) plus
//     sigma C_k / denom times normal c D + e of client k's own stream.
// Every sum runs in a fixed order (fixed-shape butterflies, sequential loops), so results are bitwise
// reproducible and a client's results do not depend on the other clients of the launch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "../checks.h"
#include "../philox.h"
#include "cuda_utils.cuh"

namespace fpl_fast {
namespace {

using cuda::ceil_div;
using cuda::kWarpSize;

constexpr int kThreads = 128;
constexpr double kNormEps = 1e-12;  // reference.NORM_EPS

template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, v, m);
    v = o > v ? o : v;
  }
  return v;
}

// out[r] = max(||rows[r]||, eps), a warp per row.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) row_norm_kernel(const acc_t* __restrict__ rows, int64_t n_rows,
                                                            int64_t D, acc_t eps, acc_t* __restrict__ out) {
  const int64_t row = blockIdx.x * int64_t(kThreads / kWarpSize) + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= n_rows) return;  // whole warps leave together
  const acc_t* p = rows + row * D;
  acc_t s = 0;
  for (int64_t e = lane; e < D; e += kWarpSize) s += p[e] * p[e];
  s = cuda::warp_sum(s);
  if (lane == 0) out[row] = max(sqrt(s), eps);
}

// One block per example (k, i); dynamic shared memory: n_cls cosines.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    example_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ t,
                   const int64_t* __restrict__ labels, const acc_t* __restrict__ mask,
                   const float* __restrict__ clip, const acc_t* __restrict__ tn, const acc_t* __restrict__ xn,
                   int64_t b, int64_t n_cls, int64_t D, acc_t s, acc_t clip_eps, acc_t* __restrict__ wt,
                   acc_t* __restrict__ proj_terms, float* __restrict__ norms, float* __restrict__ losses) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* cs = reinterpret_cast<acc_t*>(smem_raw);
  const int64_t ex = blockIdx.x;  // k * b + i
  const int64_t k = ex / b, i = ex % b;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  const acc_t* xi = x + ex * D;
  const acc_t rx = acc_t(1) / xn[ex];
  const acc_t* tk = t + k * n_cls * D;
  const acc_t* tnk = tn + k * n_cls;
  for (int64_t c = warp; c < n_cls; c += n_warps) {
    const acc_t* tc = tk + c * D;
    acc_t d = 0;
    for (int64_t e = lane; e < D; e += kWarpSize) d += xi[e] * tc[e];
    d = cuda::warp_sum(d);
    if (lane == 0) cs[c] = d * rx / tnk[c];
  }
  __syncthreads();
  if (warp != 0) return;
  // Warp 0: log-softmax over the classes, the loss, the closed-form norm and the clip factor.
  acc_t mx = -INFINITY;
  for (int64_t c = lane; c < n_cls; c += kWarpSize) mx = max(mx, s * cs[c]);
  mx = warp_max(mx);
  acc_t sum = 0;
  for (int64_t c = lane; c < n_cls; c += kWarpSize) sum += exp(s * cs[c] - mx);
  sum = cuda::warp_sum(sum);
  const int64_t y = labels[ex];
  const acc_t m = mask != nullptr ? mask[ex] : acc_t(1);
  const acc_t xh = xn[ex] * rx;  // ||x^_i||: 1, or 0 for a zero feature
  const acc_t xsq = xh * xh;
  const acc_t inv_sum = acc_t(1) / sum;
  acc_t sq = 0;
  for (int64_t c = lane; c < n_cls; c += kWarpSize) {
    const acc_t w = exp(s * cs[c] - mx) * inv_sum - (c == y ? acc_t(1) : acc_t(0));
    const acc_t r = xsq - cs[c] * cs[c];
    sq += w * w * (r > acc_t(0) ? r : acc_t(0)) / (tnk[c] * tnk[c]);
  }
  sq = cuda::warp_sum(sq);
  const acc_t norm = s * sqrt(sq) * m;
  const acc_t f = cuda::clip_factor(norm, static_cast<acc_t>(clip[k]), clip_eps) * m;
  if (lane == 0) {
    norms[ex] = static_cast<float>(norm);
    losses[ex] = static_cast<float>(-(s * cs[y] - mx - log(sum)) * m);
  }
  for (int64_t c = lane; c < n_cls; c += kWarpSize) {
    const acc_t w = exp(s * cs[c] - mx) * inv_sum - (c == y ? acc_t(1) : acc_t(0));
    wt[(k * n_cls + c) * b + i] = f * w * rx;
    proj_terms[ex * n_cls + c] = f * w * cs[c];
  }
}

// One block per class (k, c); dynamic shared memory: the b weights of the class.
template <typename out_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    release_kernel(const acc_t* __restrict__ x, const acc_t* __restrict__ t, const acc_t* __restrict__ tn,
                   const acc_t* __restrict__ wt, const acc_t* __restrict__ proj_terms,
                   const float* __restrict__ clip, int64_t b, int64_t n_cls, int64_t D, acc_t s_over_denom,
                   double noise_over_denom, bool add_noise, cuda::StreamPtrs streams,
                   out_t* __restrict__ out) {
  extern __shared__ unsigned char smem_raw[];
  acc_t* w = reinterpret_cast<acc_t*>(smem_raw);
  __shared__ acc_t proj_sh;
  const int64_t kc = blockIdx.x;  // k * n_cls + c
  const int64_t k = kc / n_cls, c = kc % n_cls;
  for (int64_t i = threadIdx.x; i < b; i += blockDim.x) w[i] = wt[kc * b + i];
  if (threadIdx.x == 0) {
    acc_t p = 0;
    for (int64_t i = 0; i < b; ++i) p += proj_terms[(k * b + i) * n_cls + c];
    proj_sh = p;
  }
  __syncthreads();
  const acc_t tnc = tn[kc];
  const acc_t alpha = s_over_denom / tnc;
  const acc_t beta = -alpha * proj_sh / tnc;
  const acc_t gamma = static_cast<acc_t>(noise_over_denom * static_cast<double>(clip[k]));
  const acc_t* xk = x + k * b * D;
  const acc_t* tc = t + kc * D;
  for (int64_t e = threadIdx.x; e < D; e += blockDim.x) {
    acc_t a = 0;
    for (int64_t i = 0; i < b; ++i) a += w[i] * xk[i * D + e];
    acc_t val = alpha * a + beta * tc[e];
    if (add_noise) {  // client k: normal c D + e of its own stream
      val += gamma * static_cast<acc_t>(
                         philox_normal(streams.seed[k], streams.offset[k], static_cast<uint64_t>(c * D + e)));
    }
    out[kc * D + e] = static_cast<out_t>(val);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dp_output_clip_noise_cuda(
    const at::Tensor& image_feats, const at::Tensor& text_feats, const at::Tensor& labels,
    const std::optional<at::Tensor>& mask, double logit_scale, const at::Tensor& clip_norm,
    double noise_multiplier, c10::IntArrayRef seed, c10::IntArrayRef offset, double denominator) {
  const OutputDpDims dims =
      check_dp_output_clip_noise(image_feats, text_feats, labels, mask, clip_norm, seed, offset);
  detail::ArgChecks("dp_output_clip_noise").cuda(text_feats, "text_feats");
  const c10::cuda::CUDAGuard device_guard(text_feats.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t K = dims.K, b = dims.b, n_cls = dims.n_cls, D = dims.D;
  const auto dtype = text_feats.scalar_type();
  const auto acc = cuda::acc_dtype(dtype);
  const auto opts = text_feats.options();
  at::Tensor release = at::empty({K, n_cls, D}, opts);
  at::Tensor norms = at::empty({K, b}, opts.dtype(at::kFloat));
  at::Tensor losses = at::empty({K, b}, opts.dtype(at::kFloat));
  if (K == 0) return {release, norms, losses};
  const at::Tensor x = cuda::to_acc(image_feats);
  const at::Tensor t = cuda::to_acc(text_feats);
  const at::Tensor m = dims.has_mask ? cuda::to_acc(*mask) : at::Tensor();
  const at::Tensor y = labels.contiguous();
  const at::Tensor cn = clip_norm.contiguous();
  const bool add_noise = noise_multiplier > 0;
  // Copied only when noise is drawn; without it the kernels never read the streams.
  const at::Tensor streams =
      add_noise ? cuda::streams_on_device(seed, offset, text_feats.device()) : at::Tensor();
  const cuda::StreamPtrs sp = add_noise ? cuda::stream_ptrs(streams) : cuda::StreamPtrs{nullptr, nullptr};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dp_output_clip_noise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = opts.dtype(acc);
    at::Tensor tn = at::empty({K, n_cls}, acc_opts);
    at::Tensor xn = at::empty({K, b}, acc_opts);
    at::Tensor wt = at::empty({K, n_cls, b}, acc_opts);
    at::Tensor proj_terms = at::empty({K, b, n_cls}, acc_opts);
    const int rows_per_block = kThreads / kWarpSize;
    const acc_t eps = static_cast<acc_t>(kNormEps);
    row_norm_kernel<acc_t><<<cuda::grid_1d(ceil_div(K * n_cls, rows_per_block)), kThreads, 0, stream>>>(
        t.data_ptr<acc_t>(), K * n_cls, D, eps, tn.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (b > 0) {
      row_norm_kernel<acc_t><<<cuda::grid_1d(ceil_div(K * b, rows_per_block)), kThreads, 0, stream>>>(
          x.data_ptr<acc_t>(), K * b, D, eps, xn.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const size_t smem = static_cast<size_t>(n_cls) * sizeof(acc_t);
      TORCH_CHECK(smem <= 48 * 1024, "fpl_fast: dp_output_clip_noise on CUDA supports at most ",
                  48 * 1024 / sizeof(acc_t), " classes, got ", n_cls);
      example_kernel<acc_t><<<cuda::grid_1d(K * b), kThreads, smem, stream>>>(
          x.data_ptr<acc_t>(), t.data_ptr<acc_t>(), y.data_ptr<int64_t>(),
          dims.has_mask ? m.data_ptr<acc_t>() : nullptr, cn.data_ptr<float>(), tn.data_ptr<acc_t>(),
          xn.data_ptr<acc_t>(), b, n_cls, D, static_cast<acc_t>(logit_scale), static_cast<acc_t>(kClipEps),
          wt.data_ptr<acc_t>(), proj_terms.data_ptr<acc_t>(), norms.data_ptr<float>(),
          losses.data_ptr<float>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (D > 0) {
      const size_t smem = static_cast<size_t>(b) * sizeof(acc_t);
      TORCH_CHECK(smem <= 48 * 1024, "fpl_fast: dp_output_clip_noise on CUDA supports at most ",
                  48 * 1024 / sizeof(acc_t), " examples per client, got ", b);
      release_kernel<scalar_t, acc_t><<<cuda::grid_1d(K * n_cls), kThreads, smem, stream>>>(
          x.data_ptr<acc_t>(), t.data_ptr<acc_t>(), tn.data_ptr<acc_t>(), wt.data_ptr<acc_t>(),
          proj_terms.data_ptr<acc_t>(), cn.data_ptr<float>(), b, n_cls, D,
          static_cast<acc_t>(logit_scale / denominator), noise_multiplier / denominator, add_noise, sp,
          release.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {release, norms, losses};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CUDA, m) { m.impl("dp_output_clip_noise", &dp_output_clip_noise_cuda); }

}  // namespace fpl_fast
