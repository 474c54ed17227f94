// dp_lowrank_clip_noise on the CPU: per-sample clipping of the prompt-factor gradients plus local-DP noise.
// Semantics: fpl_fast/ops/reference/dp_lowrank_clip_noise_ref.py. One pass over the per-sample context
// gradients: for each sample, while X is in cache, A = X V^T and the three norms (|A|, |U^T X|, |X|) are
// computed and the clipped A goes into its work unit's sum; at the end of each chunk of samples (still in
// cache) the clipped X are summed twice, with the factor of g_V and with that of g_G. The clipped g_V sum is
// U^T times the first of these (linearity), formed once per client, so no per-sample (r, d) product and no
// per-sample (K, b, r, d) tensor is ever materialised. Without u, v the clipped X are summed with the factor
// of g_L (clip norm column 0) and with that of g_G (column 2).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "../checks.h"
#include "cpu_common.h"

namespace fpl_fast {
namespace {

// Samples per work unit. Fixed (not derived from the thread count) so that the summation order, and with it
// the result, is the same however many threads run.
constexpr int64_t kChunk = 8;

template <typename scalar_t>
void dp_lowrank_clip_noise_kernel(const at::Tensor& grad, const at::Tensor& u_acc, const at::Tensor& v_acc,
                                  const DpClipNoiseDims& dims, const at::Tensor& clip_norm,
                                  double noise_multiplier, c10::IntArrayRef seed, c10::IntArrayRef offset,
                                  bool joint_uv, bool per_sample, bool normalize, double stability,
                                  at::Tensor& out_a, at::Tensor& out_b, at::Tensor& out_g,
                                  at::Tensor& norms) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = dims.K, b = dims.b, n_cls = dims.n_cls, n = dims.n_ctx, d = dims.d, r = dims.r;
  const int64_t nd = n * d, nr = n * r, rd = r * d;  // r = 0 without u, v
  const bool uv = dims.has_uv;
  const int64_t b_out = per_sample ? b : 1;  // rows of norms per client
  // (K, 3): client k's clip norms of g_U (or g_L), g_V, g_G.
  const at::Tensor clip_c = clip_norm.contiguous();
  const double* cp = clip_c.data_ptr<double>();
  // Without u, v and with C of g_L = C of g_G for every client the two clipped sums of X are one.
  bool one_sum = !uv;
  for (int64_t k = 0; k < K && one_sum; ++k) one_sum = cp[k * 3] == cp[k * 3 + 2];
  // Sums of cu A (uv), cv X (uv; without u, v: cL X), cg X (the same as cL X when one_sum).
  const int64_t unit_len = one_sum ? nd : nr + 2 * nd;
  const int64_t units_per_client = per_sample ? (b + kChunk - 1) / kChunk : 1;
  const int64_t sample_stride = n_cls * nd;
  const int64_t client_stride = b * sample_stride;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor partial = at::empty({K * units_per_client, unit_len}, grad.options().dtype(acc_dtype));

  const scalar_t* gp = grad.data_ptr<scalar_t>();
  const acc_t* up = uv ? u_acc.data_ptr<acc_t>() : nullptr;
  const acc_t* vp = uv ? v_acc.data_ptr<acc_t>() : nullptr;
  acc_t* pp = partial.data_ptr<acc_t>();
  float* normp = norms.data_ptr<float>();
  const acc_t eps = static_cast<acc_t>(kClipEps);
  const acc_t stab = static_cast<acc_t>(stability);
  // The factor of one per-sample term: min(1, C / (norm + eps)), or C / (norm + stability) (automatic
  // clipping).
  auto clip = [&](acc_t norm, acc_t C) {
    return normalize ? C / (norm + stab) : std::min(C / (norm + eps), acc_t(1));
  };
  // A sample needs a copy when it must be converted (half/bfloat16) or summed over classes.
  const bool direct = std::is_same<scalar_t, acc_t>::value && n_cls == 1;

  at::parallel_for(0, K * units_per_client, 1, [&](int64_t begin, int64_t end) {
    const int64_t chunk_len = per_sample ? kChunk : 1;
    std::vector<acc_t> xbuf(direct && per_sample ? 0 : chunk_len * nd), abuf(nr), vpack(uv ? rd : 0);
    int64_t packed_k = -1;
    const acc_t* xs[kChunk];
    acc_t wv[kChunk], wg[kChunk], sq[3];
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t k = unit / units_per_client;
      const int64_t chunk = unit % units_per_client;
      acc_t* acc_u = pp + unit * unit_len;  // (n, r) when uv
      acc_t* acc_xv = acc_u + nr;           // (n, d): sum of cv_i X_i (uv), else of cL_i X_i
      acc_t* acc_g = one_sum ? acc_xv : acc_xv + nd;
      std::fill(acc_u, acc_u + nr, acc_t(0));  // the X sums are written by weighted_sums
      const acc_t c_u = static_cast<acc_t>(cp[k * 3 + 0]);
      const acc_t c_v = static_cast<acc_t>(cp[k * 3 + 1]);
      const acc_t c_g = static_cast<acc_t>(cp[k * 3 + 2]);
      const acc_t* U = uv ? up + k * nr : nullptr;
      const acc_t* V = uv ? vp + k * rd : nullptr;
      if (uv && k != packed_k) {
        cpu::pack_rows4(V, r, d, vpack.data());
        packed_k = k;
      }
      const scalar_t* client = gp + k * client_stride;

      // xbuf + slot * nd (+)= sample i summed over classes, in acc_t.
      auto gather = [&](int64_t i, int64_t slot, bool accumulate) {
        const scalar_t* src = client + i * sample_stride;
        acc_t* dst = xbuf.data() + slot * nd;
        for (int64_t c = 0; c < n_cls; ++c) cpu::load_acc(nd, src + c * nd, dst, accumulate || c > 0);
      };
      int64_t count, row0;
      if (per_sample) {
        row0 = chunk * kChunk;
        count = std::min(b, row0 + kChunk) - row0;
        for (int64_t s = 0; s < count; ++s) {
          if (direct) {
            xs[s] = reinterpret_cast<const acc_t*>(client + (row0 + s) * sample_stride);
          } else {
            gather(row0 + s, s, false);
            xs[s] = xbuf.data() + s * nd;
          }
        }
      } else {
        // The batch mean is clipped instead (the authors' batch-level clipping).
        row0 = 0;
        count = 1;
        if (direct) {
          cpu::sum_rows(b, sample_stride, reinterpret_cast<const acc_t*>(client), nd, xbuf.data());
        } else {
          std::fill(xbuf.begin(), xbuf.end(), acc_t(0));
          for (int64_t i = 0; i < b; ++i) gather(i, 0, true);
        }
        if (b > 0) {
          for (auto& e : xbuf) e /= static_cast<acc_t>(b);
        }
        xs[0] = xbuf.data();
      }
      for (int64_t s = 0; s < count; ++s) {
        float* nrm = normp + (k * b_out + row0 + s) * 3;
        if (uv) {
          // Prefetch the next sample: the next one in this chunk, else (direct reads) the next in memory,
          // which is this thread's next unit's first sample when that unit follows.
          const acc_t* next = s + 1 < count                            ? xs[s + 1]
                              : direct && per_sample && unit + 1 < end ? xs[s] + sample_stride
                                                                       : nullptr;
          cpu::factor_norms(xs[s], U, V, vpack.data(), n, d, r, abuf.data(), sq, next);
          const acc_t norm_u = std::sqrt(sq[0]), norm_v = std::sqrt(sq[1]), norm_g = std::sqrt(sq[2]);
          acc_t cu, cv;
          if (joint_uv) {
            cu = cv = clip(std::sqrt(sq[0] + sq[1]), c_u);
          } else {
            cu = clip(norm_u, c_u);
            cv = clip(norm_v, c_v);
          }
          cpu::axpy(nr, cu, abuf.data(), acc_u);
          wv[s] = cv;
          wg[s] = clip(norm_g, c_g);
          nrm[0] = static_cast<float>(norm_u);
          nrm[1] = static_cast<float>(norm_v);
          nrm[2] = static_cast<float>(norm_g);
        } else {
          const acc_t norm_g = std::sqrt(cpu::sumsq(nd, xs[s]));
          wv[s] = clip(norm_g, c_u);
          wg[s] = clip(norm_g, c_g);
          nrm[0] = static_cast<float>(norm_g);
          nrm[1] = 0.f;
          nrm[2] = static_cast<float>(norm_g);
        }
      }
      cpu::weighted_sums(count, xs, wg, one_sum ? nullptr : wv, nd, acc_g, one_sum ? nullptr : acc_xv);
    }
  });

  // Per client: reduce the work units in order, scale, add the noise, write the outputs.
  const double denom = dims.denom;
  const acc_t scale = static_cast<acc_t>(per_sample ? 1.0 / denom : 1.0);
  const bool noisy = noise_multiplier > 0;
  const int64_t numel_a = uv ? nr : nd;
  const int64_t numel_b = uv ? rd : 0;
  const int64_t per_client_noise = dims.noise_per_client();
  scalar_t* oa = out_a.data_ptr<scalar_t>();
  scalar_t* ob = out_b.data_ptr<scalar_t>();
  scalar_t* og = out_g.data_ptr<scalar_t>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(unit_len), sum_v(rd);
    std::vector<float> z(noisy ? per_client_noise : 0);
    for (int64_t k = begin; k < end; ++k) {
      cpu::sum_rows(units_per_client, unit_len, pp + k * units_per_client * unit_len, unit_len, sum.data());
      // Client k: normals 0 .. P - 1 of its own stream (seed[k], offset[k]).
      if (noisy)
        cpu::fill_normals(static_cast<uint64_t>(seed[k]), static_cast<uint64_t>(offset[k]), 0,
                          per_client_noise, z.data());
      // Noise std sigma C / denom, C = client k's clip norm of g_U (or g_L), and of g_V (joint: of g_U).
      const acc_t noise_a = static_cast<acc_t>(noise_multiplier * cp[k * 3] / denom);
      const acc_t noise_b = static_cast<acc_t>(noise_multiplier * cp[k * 3 + (joint_uv ? 0 : 1)] / denom);
      const acc_t* sa = sum.data();  // sum of cu A (uv), else of cL X (nr = 0)
      const acc_t* sg = one_sum ? sa : sa + nr + nd;
      // sum_i cv_i U^T X_i = U^T (sum_i cv_i X_i).
      if (uv) cpu::ut_x(up + k * nr, sa + nr, n, d, r, sum_v.data());
      const acc_t* sb = sum_v.data();
      for (int64_t e = 0; e < numel_a; ++e) {
        acc_t val = sa[e] * scale;
        if (noisy) val += static_cast<acc_t>(z[e]) * noise_a;
        oa[k * numel_a + e] = static_cast<scalar_t>(val);
      }
      for (int64_t e = 0; e < numel_b; ++e) {
        acc_t val = sb[e] * scale;
        if (noisy) val += static_cast<acc_t>(z[numel_a + e]) * noise_b;
        ob[k * numel_b + e] = static_cast<scalar_t>(val);
      }
      for (int64_t e = 0; e < nd; ++e) og[k * nd + e] = static_cast<scalar_t>(sg[e] * scale);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dp_lowrank_clip_noise_cpu(
    const at::Tensor& grad, const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& v,
    const at::Tensor& clip_norm, double noise_multiplier, c10::IntArrayRef seed, c10::IntArrayRef offset,
    double expected_batch_size, bool joint_uv, bool per_sample, bool sum_classes, bool normalize,
    double stability) {
  const DpClipNoiseDims dims =
      check_dp_lowrank_clip_noise(grad, u, v, clip_norm, seed, offset, expected_batch_size, sum_classes);
  TORCH_INTERNAL_ASSERT(grad.device().is_cpu());
  const at::Tensor x = grad.contiguous();
  const at::Tensor u_acc = dims.has_uv ? cpu::to_acc(*u) : at::Tensor();
  const at::Tensor v_acc = dims.has_uv ? cpu::to_acc(*v) : at::Tensor();
  const int64_t K = dims.K, n = dims.n_ctx, d = dims.d, r = dims.r;
  const auto opts = grad.options();
  at::Tensor out_a = at::empty(cpu::with_k(dims.batched, K, {n, dims.has_uv ? r : d}), opts);
  at::Tensor out_b = at::empty(cpu::with_k(dims.batched, K, {dims.has_uv ? r : 0, d}), opts);
  at::Tensor out_g = at::empty(cpu::with_k(dims.batched, K, {n, d}), opts);
  at::Tensor norms =
      at::empty(cpu::with_k(dims.batched, K, {per_sample ? dims.b : 1, 3}), opts.dtype(at::kFloat));
  if (K == 0) return {out_a, out_b, out_g, norms};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "dp_lowrank_clip_noise_cpu", [&] {
        dp_lowrank_clip_noise_kernel<scalar_t>(x, u_acc, v_acc, dims, clip_norm, noise_multiplier, seed,
                                               offset, joint_uv, per_sample, normalize, stability, out_a,
                                               out_b, out_g, norms);
      });
  return {out_a, out_b, out_g, norms};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CPU, m) { m.impl("dp_lowrank_clip_noise", &dp_lowrank_clip_noise_cpu); }

}  // namespace fpl_fast
