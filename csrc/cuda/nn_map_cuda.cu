// nn_map on CUDA: ids[i] = argmin_w ||emb[w] - y[i]||^2 over allowed w, ties to the smaller id.
// Semantics: fpl_fast/ops/reference/nn_map_ref.py.
//
// Chunked GEMM + running argmin: the vocabulary is walked in blocks of `chunk` rows (and the queries in
// blocks of rows so that the score buffer stays bounded). For each (query block, vocabulary block) one cuBLAS
// GEMM (at::mm_out) gives the dot products, then the update kernel (one thread block per query row) reduces
// ||emb[w]||^2 - 2 emb[w] . y over the vocabulary block to a (value, id) pair and merges it into the running
// minimum with a strict comparison: earlier blocks hold smaller ids, so ties go to the smaller id as on the
// CPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../checks.h"
#include "cuda_utils.cuh"

namespace fpl_fast {
namespace {

using cuda::kWarpSize;

constexpr int kThreads = 256;
// Upper bound on the elements of the (query rows x chunk) score buffer.
constexpr int64_t kMaxBufferElems = int64_t(1) << 24;

// (value, id) pair order: a valid id beats -1; then the smaller value; then the smaller id.
template <typename acc_t>
__device__ __forceinline__ void argmin_merge(acc_t& v, int64_t& i, acc_t ov, int64_t oi) {
  if (oi < 0) return;
  if (i < 0 || ov < v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    nn_map_update_kernel(const acc_t* __restrict__ dots,  // (rows, c) row-major
                         const acc_t* __restrict__ sq,    // (V,) squared norms, +inf where not allowed
                         int64_t start, int64_t c, acc_t* __restrict__ best_val,  // (rows,) running minimum
                         int64_t* __restrict__ best_id) {                         // (rows,)
  __shared__ acc_t s_val[kThreads / kWarpSize];
  __shared__ int64_t s_id[kThreads / kWarpSize];
  const int64_t row = blockIdx.x;
  const acc_t* drow = dots + row * c;
  acc_t v = std::numeric_limits<acc_t>::infinity();
  int64_t i = -1;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) {
    const acc_t s = sq[start + j] - acc_t(2) * drow[j];
    if (s < v) {  // strict: within a thread ids increase, so the first minimum is kept
      v = s;
      i = start + j;
    }
  }
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) {
    const acc_t ov = __shfl_down_sync(0xffffffffu, v, m);
    const int64_t oi = __shfl_down_sync(0xffffffffu, i, m);
    argmin_merge(v, i, ov, oi);
  }
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  if (lane == 0) {
    s_val[warp] = v;
    s_id[warp] = i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    const int n_warps = blockDim.x / kWarpSize;
    for (int w = 1; w < n_warps; ++w) argmin_merge(v, i, s_val[w], s_id[w]);
    if (i >= 0 && v < best_val[row]) {  // strict: earlier vocabulary blocks (smaller ids) win ties
      best_val[row] = v;
      best_id[row] = i;
    }
  }
}

at::Tensor nn_map_cuda(const at::Tensor& y, const at::Tensor& emb, const std::optional<at::Tensor>& allowed,
                       int64_t chunk) {
  const NnMapDims dims = check_nn_map(y, emb, allowed, chunk);
  TORCH_INTERNAL_ASSERT(y.is_cuda());
  const c10::cuda::CUDAGuard device_guard(y.device());
  at::Tensor out = at::full({dims.B}, -1, y.options().dtype(at::kLong));
  if (dims.B == 0) return out;
  const auto acc = cuda::acc_dtype(y.scalar_type());
  const at::Tensor y_acc = y.to(acc).contiguous();
  const at::Tensor emb_acc = emb.to(acc).contiguous();
  at::Tensor sq = emb_acc.mul(emb_acc).sum(1);  // (V,)
  if (dims.has_allowed) sq.masked_fill_(allowed->logical_not(), std::numeric_limits<double>::infinity());
  sq = sq.contiguous();
  at::Tensor best_val = at::full({dims.B}, std::numeric_limits<double>::infinity(), y_acc.options());
  const int64_t c_max = std::min(chunk, dims.V);
  const int64_t row_block = std::max<int64_t>(1, std::min<int64_t>(dims.B, kMaxBufferElems / c_max));
  at::Tensor buffer = at::empty({row_block * c_max}, y_acc.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(acc, "nn_map_cuda", [&] {
    for (int64_t r0 = 0; r0 < dims.B; r0 += row_block) {
      const int64_t rows = std::min(row_block, dims.B - r0);
      const at::Tensor y_blk = y_acc.narrow(0, r0, rows);
      for (int64_t start = 0; start < dims.V; start += chunk) {
        const int64_t c = std::min(chunk, dims.V - start);
        at::Tensor dots = buffer.narrow(0, 0, rows * c).view({rows, c});
        at::mm_out(dots, y_blk, emb_acc.narrow(0, start, c).t());
        nn_map_update_kernel<scalar_t><<<cuda::grid_1d(rows), kThreads, 0, stream>>>(
            dots.data_ptr<scalar_t>(), sq.data_ptr<scalar_t>(), start, c, best_val.data_ptr<scalar_t>() + r0,
            out.data_ptr<int64_t>() + r0);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CUDA, m) { m.impl("nn_map", &nn_map_cuda); }

}  // namespace fpl_fast
