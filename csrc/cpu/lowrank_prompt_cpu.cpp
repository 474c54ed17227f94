// lowrank_prompt and its backward on the CPU. Semantics: fpl_fast/ops/reference/lowrank_prompt_ref.py.
// Forward: ctx = G + U V (+ R) is formed once per client (accumulated in float, or double for double inputs,
// and rounded once), then every class row of the output is written as [prefix | ctx | suffix] by plain
// copies. Backward: the context rows of grad_out are summed over classes, then multiplied by V^T and U^T per
// client.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "cpu_common.h"

namespace fpl_fast {
namespace {

template <typename scalar_t>
void lowrank_prompt_kernel(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& g,
                           const at::Tensor& u_acc, const at::Tensor& v_acc, const at::Tensor& residual,
                           const LowrankPromptDims& dims, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = dims.K, n_cls = dims.n_cls, n = dims.n_ctx, S = dims.S, d = dims.d, r = dims.r;
  const int64_t L = dims.L(), nd = n * d;
  // Clients with their own context; 1 when nothing carries K (then all clients share one ctx).
  const int64_t K_ctx = (dims.g_batched || dims.u_batched || dims.v_batched || dims.residual_batched) ? K : 1;
  std::vector<scalar_t> ctx(K_ctx * nd);
  const scalar_t* gp = g.data_ptr<scalar_t>();
  const acc_t* up = dims.has_uv ? u_acc.data_ptr<acc_t>() : nullptr;
  const acc_t* vp = dims.has_uv ? v_acc.data_ptr<acc_t>() : nullptr;
  const scalar_t* rp = dims.has_residual ? residual.data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, K_ctx * n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(d);
    for (int64_t kr = begin; kr < end; ++kr) {
      const int64_t k = kr / n, i = kr % n;
      cpu::load_acc(d, gp + (dims.g_batched ? k : 0) * nd + i * d, row.data(), false);
      if (dims.has_uv) {
        const acc_t* uk = up + (dims.u_batched ? k : 0) * n * r + i * r;
        const acc_t* vk = vp + (dims.v_batched ? k : 0) * r * d;
        for (int64_t j = 0; j < r; ++j) cpu::axpy(d, uk[j], vk + j * d, row.data());
      }
      if (dims.has_residual) {
        cpu::load_acc(d, rp + (dims.residual_batched ? k : 0) * nd + i * d, row.data(), true);
      }
      scalar_t* dst = ctx.data() + k * nd + i * d;
      for (int64_t t = 0; t < d; ++t) dst[t] = static_cast<scalar_t>(row[t]);
    }
  });
  const scalar_t* pre = prefix.data_ptr<scalar_t>();
  const scalar_t* suf = suffix.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  at::parallel_for(0, K * n_cls, 1, [&](int64_t begin, int64_t end) {
    for (int64_t kc = begin; kc < end; ++kc) {
      const int64_t k = kc / n_cls, c = kc % n_cls;
      scalar_t* dst = op + kc * L * d;
      std::memcpy(dst, pre + c * d, sizeof(scalar_t) * d);
      std::memcpy(dst + d, ctx.data() + (K_ctx == 1 ? 0 : k) * nd, sizeof(scalar_t) * nd);
      std::memcpy(dst + (1 + n) * d, suf + c * S * d, sizeof(scalar_t) * S * d);
    }
  });
}

at::Tensor lowrank_prompt_cpu(const at::Tensor& prefix, const at::Tensor& suffix, const at::Tensor& g,
                              const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& v,
                              const std::optional<at::Tensor>& residual) {
  const LowrankPromptDims dims = check_lowrank_prompt(prefix, suffix, g, u, v, residual);
  TORCH_INTERNAL_ASSERT(prefix.device().is_cpu());
  at::Tensor out =
      at::empty(cpu::with_k(dims.batched, dims.K, {dims.n_cls, dims.L(), dims.d}), prefix.options());
  if (out.numel() == 0) return out;
  const at::Tensor pre = prefix.contiguous(), suf = suffix.contiguous(), gc = g.contiguous();
  const at::Tensor u_acc = dims.has_uv ? cpu::to_acc(*u) : at::Tensor();
  const at::Tensor v_acc = dims.has_uv ? cpu::to_acc(*v) : at::Tensor();
  const at::Tensor res = dims.has_residual ? residual->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, prefix.scalar_type(), "lowrank_prompt_cpu", [&] {
    lowrank_prompt_kernel<scalar_t>(pre, suf, gc, u_acc, v_acc, res, dims, out);
  });
  return out;
}

template <typename scalar_t>
void lowrank_prompt_backward_kernel(const at::Tensor& go, const at::Tensor& u_acc, const at::Tensor& v_acc,
                                    const LowrankPromptBackwardDims& dims, at::Tensor& grad_ctx,
                                    at::Tensor& grad_u, at::Tensor& grad_v) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = dims.K, n_cls = dims.n_cls, L = dims.L, n = dims.n_ctx, d = dims.d, r = dims.r;
  const int64_t nd = n * d;
  std::vector<acc_t> sum(K * nd);
  const scalar_t* gp = go.data_ptr<scalar_t>();
  scalar_t* gc = grad_ctx.data_ptr<scalar_t>();
  // grad_ctx[k, i] = sum over classes of grad_out[k, c, 1 + i]. A work item is a run of context rows of one
  // client; classes are the outer loop so that each class contributes one contiguous block.
  at::parallel_for(0, K * n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ki = begin; ki < end;) {
      const int64_t k = ki / n, i0 = ki % n;
      const int64_t i1 = std::min(n, i0 + (end - ki));
      acc_t* rows = sum.data() + (k * n + i0) * d;
      const int64_t len = (i1 - i0) * d;
      std::fill(rows, rows + len, acc_t(0));
      for (int64_t c = 0; c < n_cls; ++c) {
        const scalar_t* src = gp + ((k * n_cls + c) * L + 1 + i0) * d;
        if constexpr (std::is_same<scalar_t, acc_t>::value) {
          cpu::axpy(len, acc_t(1), src, rows);
        } else {
          cpu::load_acc(len, src, rows, true);
        }
      }
      for (int64_t e = 0; e < len; ++e) gc[(k * n + i0) * d + e] = static_cast<scalar_t>(rows[e]);
      ki += i1 - i0;
    }
  });
  if (!dims.has_uv) return;
  const acc_t* up = u_acc.data_ptr<acc_t>();
  const acc_t* vp = v_acc.data_ptr<acc_t>();
  scalar_t* gu = grad_u.data_ptr<scalar_t>();
  scalar_t* gv = grad_v.data_ptr<scalar_t>();
  at::parallel_for(0, K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a(n * r), b(r * d);
    for (int64_t k = begin; k < end; ++k) {
      const acc_t* x = sum.data() + k * nd;
      const acc_t* uk = up + (dims.u_batched ? k : 0) * n * r;
      const acc_t* vk = vp + (dims.v_batched ? k : 0) * r * d;
      cpu::mm_nt(x, vk, a.data(), n, d, r);  // grad_ctx V^T (n, r)
      cpu::mm_tn(uk, x, b.data(), r, n, d);  // U^T grad_ctx (r, d)
      for (int64_t e = 0; e < n * r; ++e) gu[k * n * r + e] = static_cast<scalar_t>(a[e]);
      for (int64_t e = 0; e < r * d; ++e) gv[k * r * d + e] = static_cast<scalar_t>(b[e]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lowrank_prompt_backward_cpu(const at::Tensor& grad_out,
                                                                           const std::optional<at::Tensor>& u,
                                                                           const std::optional<at::Tensor>& v,
                                                                           int64_t n_ctx) {
  const LowrankPromptBackwardDims dims = check_lowrank_prompt_backward(grad_out, u, v, n_ctx);
  TORCH_INTERNAL_ASSERT(grad_out.device().is_cpu());
  const auto opts = grad_out.options();
  const int64_t K = dims.K, n = dims.n_ctx, d = dims.d, r = dims.r;
  at::Tensor grad_ctx = at::empty({K, n, d}, opts);
  at::Tensor grad_u = at::empty({K, dims.has_uv ? n : 0, dims.has_uv ? r : 0}, opts);
  at::Tensor grad_v = at::empty({K, dims.has_uv ? r : 0, dims.has_uv ? d : 0}, opts);
  if (K == 0) return {grad_ctx, grad_u, grad_v};
  const at::Tensor go = grad_out.contiguous();
  const at::Tensor u_acc = dims.has_uv ? cpu::to_acc(*u) : at::Tensor();
  const at::Tensor v_acc = dims.has_uv ? cpu::to_acc(*v) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, go.scalar_type(), "lowrank_prompt_backward_cpu",
      [&] { lowrank_prompt_backward_kernel<scalar_t>(go, u_acc, v_acc, dims, grad_ctx, grad_u, grad_v); });
  return {grad_ctx, grad_u, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpl_fast, CPU, m) {
  m.impl("lowrank_prompt", &lowrank_prompt_cpu);
  m.impl("lowrank_prompt_backward", &lowrank_prompt_backward_cpu);
}

}  // namespace fpl_fast
