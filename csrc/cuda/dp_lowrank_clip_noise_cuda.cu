// dp_lowrank_clip_noise on CUDA: per-sample clipping of the prompt-factor gradients plus local-DP noise.
// Semantics: fpl_fast/ops/reference/dp_lowrank_clip_noise_ref.py.
//
// Three launches; no per-sample (r, d) tensor is ever materialised:
//  1. norms kernel, one block per sample (k, i), one pass over grad_i: g_U,i = grad_i V^T (a warp per
//     context row, r dot products over d), ||U^T grad_i|| (a thread per column pair, r sums over n_ctx,
//     grad_i re-read from L1) and ||grad_i||, then the clip factors from client k's clip norms (a (K, 3)
//     device tensor; automatic clipping: C / (norm + stability)). It writes the norms, the factors and
//     g_U,i (n_ctx x r, tiny).
//  2. sum kernel, a thread per VEC elements of (k, n_ctx, d): loops over the samples of client k (grad
//     re-read from L2) and forms sum_i cG_i grad_i (the global-prompt output) and sum_i cV_i grad_i.
//  3. project kernel, a thread per output of (K, n_ctx r + r d): local U = sum_i cU_i g_U,i and
//     local V = U^T (sum_i cV_i grad_i) (g_V,i is linear in grad_i), then the scale and the Philox noise
//     (normal e of client k's own stream (seed[k], offset[k]) for its element e, U block first, as the
//     reference).
// Without u, v the local output is the clipped sum of grad_i itself (the factors of g_L in the cV slot),
// written with its noise by kernel 2. Noise std sigma C / denom with client k's C, formed in the kernels.
// Class sums (sum_classes) and the batch mean (per_sample = false) are taken first with at:: reductions in
// op-math precision; the kernels then see (K, b', n_ctx, d). Every sum runs in a fixed order, so the
// result is bitwise reproducible.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "../philox.h"
#include "cuda_utils.cuh"

namespace fpl_fast {
namespace {

using cuda::ceil_div;
using cuda::kWarpSize;

constexpr int kThreads = 256;
// The sum kernel uses smaller blocks: a few thousand threads per client, spread over more multiprocessors.
constexpr int kSumThreads = 128;
// Rank columns handled per pass (register accumulators); larger ranks take several passes.
constexpr int kRankChunk = 8;

// One block per sample s = k * bs + i.
template <typename in_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    dp_lowrank_clip_noise_kernel(const in_t* __restrict__ x,       // (K, bs, n_ctx, d)
                                 const acc_t* __restrict__ u,      // (K, n_ctx, r), read when has_uv
                                 const acc_t* __restrict__ v,      // (K, r, d), read when has_uv
                                 float* __restrict__ norms,        // (K, bs, 3): ||g_U||, ||g_V||, ||g_G||
                                 acc_t* __restrict__ coef,         // (K, bs, 3): clip factors cU, cV, cG
                                 acc_t* __restrict__ proj_u,       // (K, bs, n_ctx, r): g_U,i, when has_uv
                                 const double* __restrict__ clip,  // (K, 3): C of g_U (or g_L), g_V, g_G
                                 int64_t bs, int64_t n_ctx, int64_t d, int64_t r, bool has_uv, acc_t eps,
                                 bool joint_uv, bool normalize, acc_t stability) {
  __shared__ acc_t red[3 * kWarpSize];
  const int64_t sample = blockIdx.x;
  const int64_t k = sample / bs;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
  const in_t* xs = x + sample * n_ctx * d;         // (n_ctx, d)
  acc_t sums[3] = {acc_t(0), acc_t(0), acc_t(0)};  // ||g_U||^2, ||g_V||^2, ||g_G||^2 (partial per thread)

  // Rows: warp w takes rows t = w, w + n_warps, ...; its lanes stride over the columns. Pass j0 forms the dot
  // products of row t with rows j0 .. j0 + kRankChunk - 1 of V; the first pass also sums x^2.
  const acc_t* v_k = has_uv ? v + k * r * d : nullptr;
  for (int64_t t = warp; t < n_ctx; t += n_warps) {
    const in_t* x_row = xs + t * d;
    for (int64_t j0 = 0; j0 == 0 || j0 < r; j0 += kRankChunk) {
      acc_t dot[kRankChunk];
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj) dot[jj] = acc_t(0);
      // Unrolled so that several loads of x (the one HBM stream of this kernel) are in flight per lane.
#pragma unroll 4
      for (int64_t col = int64_t(lane) * VEC; col < d; col += int64_t(kWarpSize) * VEC) {
        acc_t xv[VEC];
        cuda::load_vec<VEC>(x_row + col, xv);
        if (j0 == 0) {
#pragma unroll
          for (int q = 0; q < VEC; ++q) sums[2] += xv[q] * xv[q];
        }
        if (has_uv) {
#pragma unroll
          for (int jj = 0; jj < kRankChunk; ++jj) {
            if (j0 + jj < r) {
              acc_t vv[VEC];
              cuda::load_vec<VEC>(v_k + (j0 + jj) * d + col, vv);
#pragma unroll
              for (int q = 0; q < VEC; ++q) dot[jj] += xv[q] * vv[q];
            }
          }
        }
      }
      if (has_uv) {  // uniform over the block: every lane of the warp reaches the shuffles
#pragma unroll
        for (int jj = 0; jj < kRankChunk; ++jj) {
          const acc_t s = cuda::warp_sum(dot[jj]);
          if (lane == 0 && j0 + jj < r) {
            proj_u[(sample * n_ctx + t) * r + j0 + jj] = s;
            sums[0] += s * s;
          }
        }
      }
    }
  }

  // Columns: thread p takes the column pairs (PB columns) p, p + blockDim, ...; U^T x at those columns is a
  // sum over the n_ctx rows, entirely in registers.
  if (has_uv) {
    constexpr int PB = VEC < 2 ? VEC : 2;
    const acc_t* u_k = u + k * n_ctx * r;
    for (int64_t col = int64_t(threadIdx.x) * PB; col < d; col += int64_t(blockDim.x) * PB) {
      for (int64_t j0 = 0; j0 < r; j0 += kRankChunk) {
        acc_t bsum[kRankChunk][PB];
#pragma unroll
        for (int jj = 0; jj < kRankChunk; ++jj) {
#pragma unroll
          for (int q = 0; q < PB; ++q) bsum[jj][q] = acc_t(0);
        }
        for (int64_t t = 0; t < n_ctx; ++t) {
          acc_t xv[PB];
          cuda::load_vec<PB>(xs + t * d + col, xv);
#pragma unroll
          for (int jj = 0; jj < kRankChunk; ++jj) {
            if (j0 + jj < r) {
              const acc_t uu = u_k[t * r + j0 + jj];
#pragma unroll
              for (int q = 0; q < PB; ++q) bsum[jj][q] += uu * xv[q];
            }
          }
        }
#pragma unroll
        for (int jj = 0; jj < kRankChunk; ++jj) {
#pragma unroll
          for (int q = 0; q < PB; ++q) sums[1] += bsum[jj][q] * bsum[jj][q];  // zero for jj beyond r
        }
      }
    }
  }

  cuda::block_sum<acc_t, 3>(sums, red);
  if (threadIdx.x == 0) {
    const acc_t clip_u = static_cast<acc_t>(clip[k * 3 + 0]);
    const acc_t clip_v = static_cast<acc_t>(clip[k * 3 + 1]);
    const acc_t clip_g = static_cast<acc_t>(clip[k * 3 + 2]);
    auto factor = [&](acc_t norm, acc_t c) {
      return normalize ? c / (norm + stability) : cuda::clip_factor(norm, c, eps);
    };
    const acc_t norm_g = sqrt(sums[2]);
    const acc_t c_g = factor(norm_g, clip_g);
    acc_t norm_u, norm_v, c_u, c_v;
    if (has_uv) {
      norm_u = sqrt(sums[0]);
      norm_v = sqrt(sums[1]);
      if (joint_uv) {
        c_u = c_v = factor(sqrt(sums[0] + sums[1]), clip_u);
      } else {
        c_u = factor(norm_u, clip_u);
        c_v = factor(norm_v, clip_v);
      }
    } else {  // the reference reports (||grad||, 0, ||grad||) for the full local prompt
      norm_u = norm_g;
      norm_v = acc_t(0);
      c_u = c_v = factor(norm_g, clip_u);  // g_L's factor, summed in the cV slot by the sum kernel
    }
    norms[sample * 3 + 0] = static_cast<float>(norm_u);
    norms[sample * 3 + 1] = static_cast<float>(norm_v);
    norms[sample * 3 + 2] = static_cast<float>(norm_g);
    coef[sample * 3 + 0] = c_u;
    coef[sample * 3 + 1] = c_v;
    coef[sample * 3 + 2] = c_g;
  }
}

// Grid: K * blocks_per_client blocks; thread -> elements e0 .. e0 + VEC - 1 of client k's (n_ctx, d) block.
template <typename in_t, typename out_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kSumThreads)
    dp_lowrank_clip_noise_sum_kernel(const in_t* __restrict__ x,      // (K, bs, n_ctx, d)
                                     const acc_t* __restrict__ coef,  // (K, bs, 3)
                                     out_t* __restrict__ glob,        // (K, n_ctx, d): sum_i cG_i x_i * scale
                                     acc_t* __restrict__ sum_v,  // (K, n_ctx, d): sum_i cV_i x_i, or null
                                     out_t* __restrict__ local_full,  // (K, n_ctx, d) without u, v; else null
                                     const double* __restrict__ clip,  // (K, 3)
                                     int64_t bs, int64_t numel, int64_t blocks_per_client, acc_t scale,
                                     bool add_noise, double sigma, double denom, cuda::StreamPtrs streams) {
  const int64_t k = blockIdx.x / blocks_per_client;
  const int64_t e0 = ((blockIdx.x % blocks_per_client) * int64_t(blockDim.x) + threadIdx.x) * VEC;
  if (e0 >= numel) return;
  const in_t* x_k = x + k * bs * numel + e0;
  const acc_t* c_k = coef + k * bs * 3;
  acc_t sg[VEC], sv[VEC];
#pragma unroll
  for (int q = 0; q < VEC; ++q) sg[q] = sv[q] = acc_t(0);
#pragma unroll 4
  for (int64_t i = 0; i < bs; ++i) {
    acc_t xv[VEC];
    cuda::load_vec<VEC>(x_k + i * numel, xv);
    const acc_t cv = c_k[i * 3 + 1];
    const acc_t cg = c_k[i * 3 + 2];
#pragma unroll
    for (int q = 0; q < VEC; ++q) {
      sg[q] += cg * xv[q];
      sv[q] += cv * xv[q];
    }
  }
  acc_t out[VEC];
#pragma unroll
  for (int q = 0; q < VEC; ++q) out[q] = sg[q] * scale;
  cuda::store_vec<VEC>(glob + k * numel + e0, out);
  if (sum_v != nullptr) cuda::store_vec<VEC>(sum_v + k * numel + e0, sv);
  if (local_full != nullptr) {  // the clipped sum of g_L: cV holds its factors
#pragma unroll
    for (int q = 0; q < VEC; ++q) out[q] = sv[q] * scale;
    if (add_noise) {  // client k: normal e of its own stream, std sigma C_k / denom
      const uint64_t seed = streams.seed[k], offset = streams.offset[k];
      const acc_t noise_std = static_cast<acc_t>(sigma * clip[k * 3] / denom);
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        const uint64_t j = static_cast<uint64_t>(e0 + q);
        out[q] += static_cast<acc_t>(philox_normal(seed, offset, j)) * noise_std;
      }
    }
    cuda::store_vec<VEC>(local_full + k * numel + e0, out);
  }
}

// Grid: K * blocks_per_client blocks; thread -> output e of client k's n_ctx r + r d (U block first).
template <typename out_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dp_lowrank_clip_noise_project_kernel(const acc_t* __restrict__ coef,    // (K, bs, 3)
                                         const acc_t* __restrict__ proj_u,  // (K, bs, n_ctx, r)
                                         const acc_t* __restrict__ u,       // (K, n_ctx, r)
                                         const acc_t* __restrict__ sum_v,   // (K, n_ctx, d)
                                         out_t* __restrict__ local_u,       // (K, n_ctx, r)
                                         out_t* __restrict__ local_v,       // (K, r, d)
                                         const double* __restrict__ clip,   // (K, 3)
                                         int64_t bs, int64_t n_ctx, int64_t d, int64_t r,
                                         int64_t blocks_per_client, acc_t scale, bool add_noise, double sigma,
                                         double denom, int v_clip_col, cuda::StreamPtrs streams) {
  const int64_t k = blockIdx.x / blocks_per_client;
  const int64_t e = (blockIdx.x % blocks_per_client) * int64_t(blockDim.x) + threadIdx.x;
  const int64_t n_u = n_ctx * r;
  const int64_t per_client = n_u + r * d;
  if (e >= per_client) return;
  acc_t val = 0;
  out_t* dst;
  int clip_col = 0;  // the clip norm whose sigma C / denom is this output's noise std
  if (e < n_u) {     // local U[t, j] = sum_i cU_i g_U,i[t, j], e = t r + j
    for (int64_t i = 0; i < bs; ++i) val += coef[(k * bs + i) * 3 + 0] * proj_u[(k * bs + i) * n_u + e];
    dst = local_u + k * n_u + e;
  } else {  // local V[j, col] = sum_t U[t, j] (sum_i cV_i x_i)[t, col], e - n_u = j d + col
    const int64_t e_v = e - n_u;
    const int64_t j = e_v / d;
    const int64_t col = e_v % d;
    for (int64_t t = 0; t < n_ctx; ++t) val += u[(k * n_ctx + t) * r + j] * sum_v[(k * n_ctx + t) * d + col];
    dst = local_v + k * r * d + e_v;
    clip_col = v_clip_col;
  }
  val *= scale;
  if (add_noise) {
    const acc_t noise_std = static_cast<acc_t>(sigma * clip[k * 3 + clip_col] / denom);
    val += static_cast<acc_t>(philox_normal(streams.seed[k], streams.offset[k], static_cast<uint64_t>(e))) *
           noise_std;
  }
  *dst = static_cast<out_t>(val);
}

struct DpParams {
  int64_t bs;           // samples per client seen by the kernels (b, or 1 for the batch mean)
  const double* clip;   // device pointer: (K, 3) clip norms
  double scale;         // 1 / denom per sample, 1 for the batch mean
  double sigma, denom;  // noise std sigma C / denom, C per client
  double stability;     // automatic clipping's C / (norm + stability)
  bool add_noise, joint_uv, normalize;
  cuda::StreamPtrs streams;  // device pointers: client k's seed and offset
};

template <typename in_t, typename out_t, int VEC>
void launch_dp(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v, const DpClipNoiseDims& dims,
               const DpParams& p, at::Tensor& local_u, at::Tensor& local_v, at::Tensor& glob,
               at::Tensor& norms) {
  using acc_t = at::opmath_type<out_t>;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const int64_t K = dims.K, n_ctx = dims.n_ctx, d = dims.d, r = dims.r, bs = p.bs;
  const int64_t numel = n_ctx * d;
  const bool has_uv = dims.has_uv;
  at::Tensor coef = at::empty({K, bs, 3}, acc_opts);
  at::Tensor proj_u = has_uv ? at::empty({K, bs, n_ctx, r}, acc_opts) : at::Tensor();
  at::Tensor sum_v = has_uv ? at::empty({K, n_ctx, d}, acc_opts) : at::Tensor();
  const acc_t* u_ptr = has_uv ? u.data_ptr<acc_t>() : nullptr;
  const acc_t* v_ptr = has_uv ? v.data_ptr<acc_t>() : nullptr;
  acc_t* proj_ptr = has_uv ? proj_u.data_ptr<acc_t>() : nullptr;
  acc_t* sum_v_ptr = has_uv ? sum_v.data_ptr<acc_t>() : nullptr;
  const acc_t scale = static_cast<acc_t>(p.scale);

  if (K * bs > 0) {
    dp_lowrank_clip_noise_kernel<in_t, acc_t, VEC><<<cuda::grid_1d(K * bs), kThreads, 0, stream>>>(
        x.data_ptr<in_t>(), u_ptr, v_ptr, norms.data_ptr<float>(), coef.data_ptr<acc_t>(), proj_ptr, p.clip,
        bs, n_ctx, d, has_uv ? r : 0, has_uv, static_cast<acc_t>(kClipEps), p.joint_uv, p.normalize,
        static_cast<acc_t>(p.stability));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (numel > 0) {
    const int64_t blocks_per_client = ceil_div(numel / VEC, kSumThreads);
    dp_lowrank_clip_noise_sum_kernel<in_t, out_t, acc_t, VEC>
        <<<cuda::grid_1d(K * blocks_per_client), kSumThreads, 0, stream>>>(
            x.data_ptr<in_t>(), coef.data_ptr<acc_t>(), glob.data_ptr<out_t>(), sum_v_ptr,
            has_uv ? nullptr : local_u.data_ptr<out_t>(), p.clip, bs, numel, blocks_per_client, scale,
            p.add_noise, p.sigma, p.denom, p.streams);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t per_client = n_ctx * r + r * d;
  if (has_uv && per_client > 0) {
    const int64_t blocks_per_client = ceil_div(per_client, kThreads);
    dp_lowrank_clip_noise_project_kernel<out_t, acc_t>
        <<<cuda::grid_1d(K * blocks_per_client), kThreads, 0, stream>>>(
            coef.data_ptr<acc_t>(), proj_ptr, u_ptr, sum_v_ptr, local_u.data_ptr<out_t>(),
            local_v.data_ptr<out_t>(), p.clip, bs, n_ctx, d, r, blocks_per_client, scale, p.add_noise,
            p.sigma, p.denom, p.joint_uv ? 0 : 1, p.streams);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// Picks the widest vector width (16 bytes of in_t) that d and the pointers allow.
template <typename in_t, typename out_t>
void dispatch_vec(const at::Tensor& x, const at::Tensor& u, const at::Tensor& v, const DpClipNoiseDims& dims,
                  const DpParams& p, at::Tensor& local_u, at::Tensor& local_v, at::Tensor& glob,
                  at::Tensor& norms) {
  using acc_t = at::opmath_type<out_t>;
  constexpr int kVec = 16 / sizeof(in_t);
  // x rows and V rows are read kVec at a time; outputs and scratch are fresh allocations (aligned).
  const bool vec_ok = dims.d % kVec == 0 && cuda::is_aligned(x.data_ptr(), kVec * sizeof(in_t)) &&
                      (!v.defined() || cuda::is_aligned(v.data_ptr(), kVec * sizeof(acc_t))) &&
                      cuda::is_aligned(glob.data_ptr(), kVec * sizeof(out_t)) &&
                      cuda::is_aligned(local_u.data_ptr(), kVec * sizeof(out_t));
  if (vec_ok) {
    launch_dp<in_t, out_t, kVec>(x, u, v, dims, p, local_u, local_v, glob, norms);
  } else {
    launch_dp<in_t, out_t, 1>(x, u, v, dims, p, local_u, local_v, glob, norms);
  }
}

std::vector<int64_t> with_k(bool batched, int64_t K, std::initializer_list<int64_t> rest) {
  std::vector<int64_t> sizes;
  if (batched) sizes.push_back(K);
  sizes.insert(sizes.end(), rest.begin(), rest.end());
  return sizes;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dp_lowrank_clip_noise_cuda(
    const at::Tensor& grad, const std::optional<at::Tensor>& u_in, const std::optional<at::Tensor>& v_in,
    const at::Tensor& clip_norm, double noise_multiplier, c10::IntArrayRef seed, c10::IntArrayRef offset,
    double expected_batch_size, bool joint_uv, bool per_sample, bool sum_classes, bool normalize,
    double stability) {
  const DpClipNoiseDims dims = check_dp_lowrank_clip_noise(grad, u_in, v_in, clip_norm, seed, offset,
                                                           expected_batch_size, sum_classes);
  detail::ArgChecks("dp_lowrank_clip_noise").cuda(grad, "grad");
  const c10::cuda::CUDAGuard device_guard(grad.device());
  const int64_t K = dims.K, b = dims.b, n_ctx = dims.n_ctx, d = dims.d, r = dims.r;
  const bool has_uv = dims.has_uv;
  const int64_t bs = per_sample ? b : 1;
  const auto dtype = grad.scalar_type();
  const auto acc = cuda::acc_dtype(dtype);
  const auto opts = grad.options();
  at::Tensor local_u = at::empty(with_k(dims.batched, K, {n_ctx, has_uv ? r : d}), opts);
  at::Tensor local_v = at::empty(with_k(dims.batched, K, {has_uv ? r : 0, d}), opts);
  at::Tensor glob = at::empty(with_k(dims.batched, K, {n_ctx, d}), opts);
  at::Tensor norms = at::empty(with_k(dims.batched, K, {bs, 3}), opts.dtype(at::kFloat));
  if (K == 0) return {local_u, local_v, glob, norms};

  at::Tensor x = grad.contiguous();
  if (!dims.batched) x = x.unsqueeze(0);  // (K, b, [n_cls,] n_ctx, d)
  if (sum_classes)
    x = at::sum(x, at::IntArrayRef{2}, /*keepdim=*/false, acc);  // (K, b, n_ctx, d), op-math precision
  if (!per_sample) {
    // The authors' batch-level clipping: the batch mean (zeros for an empty batch) is what gets clipped.
    x = b > 0 ? x.to(acc).mean(at::IntArrayRef{1}, /*keepdim=*/true)
              : at::zeros({K, 1, n_ctx, d}, opts.dtype(acc));
  }
  x = x.contiguous();
  at::Tensor u, v;
  if (has_uv) {
    u = cuda::to_acc(dims.batched ? *u_in : u_in->unsqueeze(0));  // (K, n_ctx, r)
    v = cuda::to_acc(dims.batched ? *v_in : v_in->unsqueeze(0));  // (K, r, d)
  }
  const at::Tensor clip = clip_norm.contiguous();  // (K, 3) or (3,): the same memory
  DpParams p;
  p.bs = bs;
  p.clip = clip.data_ptr<double>();
  p.scale = per_sample ? 1.0 / dims.denom : 1.0;  // batch mode: clip(mean) itself, only the noise is divided
  p.sigma = noise_multiplier;
  p.denom = dims.denom;
  p.stability = stability;
  p.add_noise = noise_multiplier > 0;
  p.joint_uv = joint_uv;
  p.normalize = normalize;
  // Copied only when noise is drawn; without it the kernels never read the streams.
  const at::Tensor streams =
      p.add_noise ? cuda::streams_on_device(seed, offset, grad.device()) : at::Tensor();
  p.streams = p.add_noise ? cuda::stream_ptrs(streams) : cuda::StreamPtrs{nullptr, nullptr};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dp_lowrank_clip_noise_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (x.scalar_type() == dtype) {
      dispatch_vec<scalar_t, scalar_t>(x, u, v, dims, p, local_u, local_v, glob, norms);
    } else {  // class-summed or batch-mean input, already in op-math precision
      dispatch_vec<acc_t, scalar_t>(x, u, v, dims, p, local_u, local_v, glob, norms);
    }
  });
  return {local_u, local_v, glob, norms};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CUDA, m) { m.impl("dp_lowrank_clip_noise", &dp_lowrank_clip_noise_cuda); }

}  // namespace fpl_fast
