// lowrank_prompt and lowrank_prompt_backward on CUDA. Semantics:
// fpl_fast/ops/reference/lowrank_prompt_ref.py.
//
// Forward: one kernel writes [prefix | G + U V (+ R) | suffix] for every client and class. A block owns
// one (client k, token row l) pair and a chunk of classes; a context row is computed once per thread (in
// op-math precision) and stored to all the block's classes, prefix and suffix rows are copied; 16-byte
// vector accesses when d and every pointer allow them.
// Backward: a kernel sums grad_out over the classes at the context rows (op-math precision, fixed order);
// the factor gradients grad_ctx V^T and U^T grad_ctx are small dense products left to at::matmul.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "cuda_utils.cuh"

namespace fpl_fast {
namespace {

using cuda::ceil_div;
using cuda::is_aligned;
using cuda::Vec;

constexpr int kThreads = 256;
constexpr int kClassesPerThread = 4;

// Grid: K * L * n_chunks blocks, block (tx, ty). Block (k, l, chunk) writes out[k, c, l, :] for the classes
// c = chunk * ty * kClassesPerThread + threadIdx.y + m * ty, m < kClassesPerThread.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    lowrank_prompt_kernel(scalar_t* __restrict__ out,             // (K, n_cls, L, d)
                          const scalar_t* __restrict__ prefix,    // (n_cls, 1, d)
                          const scalar_t* __restrict__ suffix,    // (n_cls, S, d)
                          const scalar_t* __restrict__ g,         // (K or 1, n_ctx, d)
                          const scalar_t* __restrict__ u,         // (K or 1, n_ctx, r) or null
                          const scalar_t* __restrict__ v,         // (K or 1, r, d) or null
                          const scalar_t* __restrict__ residual,  // (K or 1, n_ctx, d) or null
                          int64_t n_cls, int64_t n_ctx, int64_t S, int64_t d, int64_t r, int64_t g_sk,
                          int64_t u_sk, int64_t v_sk, int64_t res_sk, int64_t n_chunks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = 1 + n_ctx + S;
  const int64_t blk = blockIdx.x;
  const int64_t chunk = blk % n_chunks;
  const int64_t l = (blk / n_chunks) % L;
  const int64_t k = blk / n_chunks / L;
  const int64_t ty = blockDim.y;
  const int64_t c0 = chunk * ty * kClassesPerThread + threadIdx.y;
  const int64_t cls_stride = L * d;  // between classes of one client in out
  scalar_t* out_row = out + k * n_cls * cls_stride + l * d;
  const bool is_ctx = l >= 1 && l <= n_ctx;

  for (int64_t col = int64_t(threadIdx.x) * VEC; col < d; col += int64_t(blockDim.x) * VEC) {
    if (is_ctx) {
      const int64_t t = l - 1;
      acc_t val[VEC];
      cuda::load_vec<VEC>(g + k * g_sk + t * d + col, val);
      if (u != nullptr) {
        acc_t uv[VEC] = {};
        const scalar_t* u_row = u + k * u_sk + t * r;
        const scalar_t* v_k = v + k * v_sk;
        for (int64_t j = 0; j < r; ++j) {
          const acc_t uj = static_cast<acc_t>(u_row[j]);
          acc_t vj[VEC];
          cuda::load_vec<VEC>(v_k + j * d + col, vj);
#pragma unroll
          for (int q = 0; q < VEC; ++q) uv[q] += uj * vj[q];
        }
#pragma unroll
        for (int q = 0; q < VEC; ++q) val[q] += uv[q];
      }
      if (residual != nullptr) {
        acc_t rv[VEC];
        cuda::load_vec<VEC>(residual + k * res_sk + t * d + col, rv);
#pragma unroll
        for (int q = 0; q < VEC; ++q) val[q] += rv[q];
      }
      Vec<scalar_t, VEC> o;
#pragma unroll
      for (int q = 0; q < VEC; ++q) o.val[q] = static_cast<scalar_t>(val[q]);
#pragma unroll
      for (int m = 0; m < kClassesPerThread; ++m) {
        const int64_t c = c0 + m * ty;
        if (c < n_cls) *reinterpret_cast<Vec<scalar_t, VEC>*>(out_row + c * cls_stride + col) = o;
      }
    } else {
      // Row 0 is the class's SOT embedding, rows 1 + n_ctx .. L - 1 its suffix rows.
      const scalar_t* src = l == 0 ? prefix + col : suffix + (l - 1 - n_ctx) * d + col;
      const int64_t src_cls_stride = l == 0 ? d : S * d;
      Vec<scalar_t, VEC> buf[kClassesPerThread];
#pragma unroll
      for (int m = 0; m < kClassesPerThread; ++m) {
        const int64_t c = c0 + m * ty;
        if (c < n_cls) buf[m] = *reinterpret_cast<const Vec<scalar_t, VEC>*>(src + c * src_cls_stride);
      }
#pragma unroll
      for (int m = 0; m < kClassesPerThread; ++m) {
        const int64_t c = c0 + m * ty;
        if (c < n_cls) *reinterpret_cast<Vec<scalar_t, VEC>*>(out_row + c * cls_stride + col) = buf[m];
      }
    }
  }
}

template <typename scalar_t, int VEC>
void launch_lowrank_prompt(at::Tensor& out, const at::Tensor& prefix, const at::Tensor& suffix,
                           const at::Tensor& g, const at::Tensor& u, const at::Tensor& v,
                           const at::Tensor& residual, const LowrankPromptDims& dims) {
  const int64_t n_vec = dims.d / VEC;
  const int tx =
      static_cast<int>(std::min<int64_t>(kThreads, ceil_div(n_vec, cuda::kWarpSize) * cuda::kWarpSize));
  const int ty = kThreads / tx;
  const int64_t n_chunks = ceil_div(dims.n_cls, int64_t(ty) * kClassesPerThread);
  const int64_t blocks = dims.K * dims.L() * n_chunks;
  const int64_t nd = dims.n_ctx * dims.d;
  auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
  lowrank_prompt_kernel<scalar_t, VEC>
      <<<cuda::grid_1d(blocks), dim3(tx, ty), 0, c10::cuda::getCurrentCUDAStream()>>>(
          out.data_ptr<scalar_t>(), prefix.data_ptr<scalar_t>(), suffix.data_ptr<scalar_t>(),
          g.data_ptr<scalar_t>(), ptr(u), ptr(v), ptr(residual), dims.n_cls, dims.n_ctx, dims.S, dims.d,
          dims.r, dims.g_batched ? nd : 0, dims.u_batched ? dims.n_ctx * dims.r : 0,
          dims.v_batched ? dims.r * dims.d : 0, dims.residual_batched ? nd : 0, n_chunks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor lowrank_prompt_cuda(const at::Tensor& prefix_in, const at::Tensor& suffix_in,
                               const at::Tensor& g_in, const std::optional<at::Tensor>& u_in,
                               const std::optional<at::Tensor>& v_in,
                               const std::optional<at::Tensor>& residual_in) {
  const LowrankPromptDims dims = check_lowrank_prompt(prefix_in, suffix_in, g_in, u_in, v_in, residual_in);
  detail::ArgChecks("lowrank_prompt").cuda(prefix_in, "prefix");  // the others are on prefix's device
  const c10::cuda::CUDAGuard device_guard(prefix_in.device());
  const at::Tensor prefix = prefix_in.contiguous();
  const at::Tensor suffix = suffix_in.contiguous();
  const at::Tensor g = g_in.contiguous();
  const at::Tensor u = dims.has_uv ? u_in->contiguous() : at::Tensor();
  const at::Tensor v = dims.has_uv ? v_in->contiguous() : at::Tensor();
  const at::Tensor residual = dims.has_residual ? residual_in->contiguous() : at::Tensor();
  std::vector<int64_t> sizes = {dims.n_cls, dims.L(), dims.d};
  if (dims.batched) sizes.insert(sizes.begin(), dims.K);
  at::Tensor out = at::empty(sizes, prefix.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prefix.scalar_type(), "lowrank_prompt_cuda", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    constexpr int64_t kBytes = 16;
    // Vector accesses need aligned row starts: d a multiple of kVec, every base pointer 16-byte aligned.
    const bool vec_ok = dims.d % kVec == 0 && is_aligned(out.data_ptr(), kBytes) &&
                        is_aligned(prefix.data_ptr(), kBytes) && is_aligned(suffix.data_ptr(), kBytes) &&
                        is_aligned(g.data_ptr(), kBytes) &&
                        (!v.defined() || is_aligned(v.data_ptr(), kBytes)) &&
                        (!residual.defined() || is_aligned(residual.data_ptr(), kBytes));
    if (vec_ok) {
      launch_lowrank_prompt<scalar_t, kVec>(out, prefix, suffix, g, u, v, residual, dims);
    } else {
      launch_lowrank_prompt<scalar_t, 1>(out, prefix, suffix, g, u, v, residual, dims);
    }
  });
  return out;
}

// Grid: K * n_ctx * ceil(d / 32) blocks of (32, kClassSlices). Thread (x, y) sums the classes
// y, y + kClassSlices, ... of column x; row y = 0 then adds the slices in order y = 0, 1, ...
constexpr int kClassSlices = 8;
constexpr int kBackwardThreads = cuda::kWarpSize * kClassSlices;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kBackwardThreads)
    lowrank_prompt_backward_kernel(acc_t* __restrict__ grad_ctx,           // (K, n_ctx, d)
                                   const scalar_t* __restrict__ grad_out,  // (K, n_cls, L, d)
                                   int64_t n_cls, int64_t L, int64_t n_ctx, int64_t d, int64_t col_blocks) {
  __shared__ acc_t part[kClassSlices][cuda::kWarpSize + 1];
  const int64_t blk = blockIdx.x;
  const int64_t cb = blk % col_blocks;
  const int64_t t = (blk / col_blocks) % n_ctx;
  const int64_t k = blk / col_blocks / n_ctx;
  const int64_t col = cb * cuda::kWarpSize + threadIdx.x;
  acc_t s = 0;
  if (col < d) {
    const scalar_t* src = grad_out + (k * n_cls * L + 1 + t) * d + col;  // class 0, row 1 + t
    for (int64_t c = threadIdx.y; c < n_cls; c += kClassSlices) s += static_cast<acc_t>(src[c * L * d]);
  }
  part[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < d) {
    acc_t total = 0;
#pragma unroll
    for (int y = 0; y < kClassSlices; ++y) total += part[y][threadIdx.x];
    grad_ctx[(k * n_ctx + t) * d + col] = total;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_prompt_backward_cuda(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& u_in,
    const std::optional<at::Tensor>& v_in, int64_t n_ctx) {
  const LowrankPromptBackwardDims dims = check_lowrank_prompt_backward(grad_out_in, u_in, v_in, n_ctx);
  detail::ArgChecks("lowrank_prompt_backward").cuda(grad_out_in, "grad_out");  // u, v are on its device
  const c10::cuda::CUDAGuard device_guard(grad_out_in.device());
  at::Tensor go = grad_out_in.contiguous();
  if (go.dim() == 3) go = go.unsqueeze(0);
  const auto dtype = go.scalar_type();
  const auto acc = cuda::acc_dtype(dtype);
  at::Tensor grad_ctx = at::empty({dims.K, dims.n_ctx, dims.d}, go.options().dtype(acc));
  if (grad_ctx.numel() > 0) {
    const int64_t col_blocks = ceil_div(dims.d, cuda::kWarpSize);
    const int64_t blocks = dims.K * dims.n_ctx * col_blocks;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowrank_prompt_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      lowrank_prompt_backward_kernel<scalar_t, acc_t>
          <<<cuda::grid_1d(blocks), dim3(cuda::kWarpSize, kClassSlices), 0,
             c10::cuda::getCurrentCUDAStream()>>>(grad_ctx.data_ptr<acc_t>(), go.data_ptr<scalar_t>(),
                                                  dims.n_cls, dims.L, dims.n_ctx, dims.d, col_blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!dims.has_uv) {
    return {grad_ctx.to(dtype), at::empty({dims.K, 0, 0}, go.options()),
            at::empty({dims.K, 0, 0}, go.options())};
  }
  // (K, n_ctx, d) x (K or 1, d, r) and (K or 1, r, n_ctx) x (K, n_ctx, d), in op-math precision.
  const at::Tensor grad_u = at::matmul(grad_ctx, v_in->to(acc).transpose(-1, -2)).to(dtype).contiguous();
  const at::Tensor grad_v = at::matmul(u_in->to(acc).transpose(-1, -2), grad_ctx).to(dtype).contiguous();
  return {grad_ctx.to(dtype), grad_u, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CUDA, m) {
  m.impl("lowrank_prompt", &lowrank_prompt_cuda);
  m.impl("lowrank_prompt_backward", &lowrank_prompt_backward_cuda);
}

}  // namespace fpl_fast
