// Helpers shared by the CUDA kernels: vector loads/stores, deterministic warp and block sums, launch helpers.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <climits>
#include <cstdint>

namespace fpl_fast {
namespace cuda {

constexpr int kWarpSize = 32;

// Host: ceil(a / b) for a >= 0, b > 0.
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Host: whether p is aligned to `bytes` (a null pointer counts as aligned: it is never dereferenced).
inline bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(bytes) == 0;
}

// Host: a 1-D grid of `blocks` blocks (at least 1 and below 2^31: callers skip empty launches).
inline dim3 grid_1d(int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= INT_MAX, "fpl_fast: CUDA grid of ", blocks, " blocks is out of range");
  return dim3(static_cast<unsigned int>(blocks));
}

// The op-math dtype of a tensor dtype: float for half/bfloat16/float, double for double.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A contiguous copy (or the tensor itself) of t in its op-math dtype.
inline at::Tensor to_acc(const at::Tensor& t) { return t.to(acc_dtype(t.scalar_type())).contiguous(); }

// Host: the per-client Philox streams on `device`, as one (2, K) int64 tensor: row 0 the seeds, row 1 the
// offsets (entries already checked to be in [0, 2^63), so reading them as uint64 keeps their value). Staged
// in pinned memory and copied on the current stream without blocking the host; the caching host allocator
// keeps the staging buffer alive until the copy has run.
inline at::Tensor streams_on_device(c10::IntArrayRef seed, c10::IntArrayRef offset,
                                    const at::Device& device) {
  TORCH_INTERNAL_ASSERT(seed.size() == offset.size());
  const int64_t K = static_cast<int64_t>(seed.size());
  at::Tensor host = at::empty({2, K}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* p = host.data_ptr<int64_t>();
  std::copy(seed.begin(), seed.end(), p);
  std::copy(offset.begin(), offset.end(), p + K);
  return host.to(at::TensorOptions().dtype(at::kLong).device(device), /*non_blocking=*/true);
}

// Device pointers to the seeds and offsets of streams_on_device's tensor.
struct StreamPtrs {
  const uint64_t* seed;
  const uint64_t* offset;
};
inline StreamPtrs stream_ptrs(const at::Tensor& streams) {
  const auto* p = reinterpret_cast<const uint64_t*>(streams.data_ptr<int64_t>());
  return {p, p + streams.size(1)};
}

// N elements of T moved as one aligned access (N * sizeof(T) = 16 bytes for the widest use).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

// out[q] = A(p[q]), q < N, as one vector load; p must be aligned to N * sizeof(T).
template <int N, typename T, typename A>
__device__ __forceinline__ void load_vec(const T* p, A (&out)[N]) {
  const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(p);
#pragma unroll
  for (int q = 0; q < N; ++q) out[q] = static_cast<A>(v.val[q]);
}

// p[q] = T(in[q]), q < N, as one vector store; p must be aligned to N * sizeof(T).
template <int N, typename T, typename A>
__device__ __forceinline__ void store_vec(T* p, const A (&in)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int q = 0; q < N; ++q) v.val[q] = static_cast<T>(in[q]);
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// Sum over the 32 lanes of a full warp. The xor butterfly adds the same two operands on both partner lanes
// (addition is commutative), so every lane ends with the bitwise-identical total: deterministic.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Sums N values over a 1-D block (blockDim.x a multiple of 32, at most 1024); every thread gets the totals.
// smem must hold N * 32 values. Fixed order, hence deterministic. All threads of the block must call it.
template <typename T, int N>
__device__ __forceinline__ void block_sum(T (&v)[N], T* smem) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int n_warps = blockDim.x / kWarpSize;
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = warp_sum(v[n]);
  if (lane == 0) {
#pragma unroll
    for (int n = 0; n < N; ++n) smem[n * kWarpSize + warp] = v[n];
  }
  __syncthreads();
#pragma unroll
  for (int n = 0; n < N; ++n) v[n] = warp_sum(lane < n_warps ? smem[n * kWarpSize + lane] : T(0));
  __syncthreads();  // smem may be reused by the caller
}

// Clip factor min(1, C / (norm + eps)); a NaN norm gives NaN, as torch.clamp in the reference.
template <typename T>
__device__ __forceinline__ T clip_factor(T norm, T clip_norm, T eps) {
  const T f = clip_norm / (norm + eps);
  return f > T(1) ? T(1) : f;
}

}  // namespace cuda
}  // namespace fpl_fast
