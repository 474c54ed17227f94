// nn_map on the CPU: ids[i] = argmin_w ||emb[w] - y[i]||^2 over allowed w, ties to the smaller id.
// Semantics: fpl_fast/ops/reference/nn_map_ref.py. Scores are ||emb[w]||^2 - 2 emb[w] . y[i] (precomputed
// squared norms, +inf for ids that are not allowed). The queries are taken in blocks of kRows rows and the
// vocabulary in blocks of `chunk` rows; for each pair of blocks one GEMM (at::mm_out, which uses every
// thread) gives the (rows x chunk) dot products, then at::parallel_for over the query rows merges them into a
// running (value, id) minimum. The (B, V) score matrix is never materialised: the buffer holds at most kRows
// x chunk scores.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../checks.h"

namespace fpl_fast {
namespace {

// Query rows per GEMM: large enough for an efficient GEMM, small enough to bound the score buffer.
constexpr int64_t kRows = 1024;

template <typename acc_t>
void nn_map_kernel(const at::Tensor& y_acc, const at::Tensor& emb_acc, const at::Tensor& sq, int64_t chunk,
                   at::Tensor& out) {
  const int64_t B = y_acc.size(0), V = emb_acc.size(0);
  const int64_t c_max = std::min(chunk, V);
  const int64_t r_max = std::min(kRows, B);
  const acc_t* sqp = sq.data_ptr<acc_t>();
  int64_t* outp = out.data_ptr<int64_t>();
  at::Tensor dots = at::empty({r_max * c_max}, y_acc.options());
  std::vector<acc_t> best(r_max);
  for (int64_t r0 = 0; r0 < B; r0 += kRows) {
    const int64_t rows = std::min(kRows, B - r0);
    const at::Tensor y_blk = y_acc.narrow(0, r0, rows);
    std::fill(best.begin(), best.begin() + rows, std::numeric_limits<acc_t>::infinity());
    int64_t* ids = outp + r0;
    std::fill(ids, ids + rows, int64_t(-1));
    for (int64_t start = 0; start < V; start += chunk) {
      const int64_t c = std::min(chunk, V - start);
      at::Tensor d_blk = dots.narrow(0, 0, rows * c).view({rows, c});
      at::mm_out(d_blk, y_blk, emb_acc.narrow(0, start, c).t());  // (rows, c), contiguous
      const acc_t* dp = d_blk.data_ptr<acc_t>();
      at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          acc_t bv = best[r];
          int64_t bi = ids[r];
          const acc_t* drow = dp + r * c;
          for (int64_t j = 0; j < c; ++j) {
            const acc_t s = sqp[start + j] - acc_t(2) * drow[j];
            if (s < bv) {  // strict: the first (smallest) id wins ties
              bv = s;
              bi = start + j;
            }
          }
          best[r] = bv;
          ids[r] = bi;
        }
      });
    }
  }
}

at::Tensor nn_map_cpu(const at::Tensor& y, const at::Tensor& emb, const std::optional<at::Tensor>& allowed,
                      int64_t chunk) {
  const NnMapDims dims = check_nn_map(y, emb, allowed, chunk);
  TORCH_INTERNAL_ASSERT(y.device().is_cpu());
  at::Tensor out = at::empty({dims.B}, y.options().dtype(at::kLong));
  if (dims.B == 0) return out;
  const auto acc = y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor y_acc = y.to(acc).contiguous();
  const at::Tensor emb_acc = emb.to(acc).contiguous();
  at::Tensor sq = emb_acc.mul(emb_acc).sum(1);  // (V,) squared norms
  if (dims.has_allowed) sq.masked_fill_(allowed->logical_not(), std::numeric_limits<double>::infinity());
  sq = sq.contiguous();
  AT_DISPATCH_FLOATING_TYPES(acc, "nn_map_cpu",
                             [&] { nn_map_kernel<scalar_t>(y_acc, emb_acc, sq, chunk, out); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CPU, m) { m.impl("nn_map", &nn_map_cpu); }

}  // namespace fpl_fast
