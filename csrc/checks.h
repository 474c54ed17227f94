// The input checks the CPU and CUDA kernels rely on, one check_<op> function per op, returning the dimensions
// its kernels use.
//
// Only what keeps a kernel in bounds and its index math right is checked: ranks and sizes, dtypes and devices
// (every tensor is read through one scalar type on one device), the integer arguments that size buffers or
// index them (rank, n_ctx, chunk, one Philox stream per client) and the label range. Strides and alignment
// are not: the kernels make their inputs contiguous and test alignment themselves. Values that are merely
// meaningless (a negative clip norm or noise multiplier) are not checked here either. The wording a user sees
// for a bad input is fpl_fast/ops/checks.py's; these messages only name the op and the argument, as
// "fpl_fast::<op>: <argument> <what is wrong>", raised as ValueError. Header-only, no CUDA includes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <vector>

namespace fpl_fast {

// Clip factor min(1, C / (norm + CLIP_EPS)) and the Gram-Schmidt guard GS_EPS, as fpl_fast/ops/reference/.
constexpr double kClipEps = 1e-6;
constexpr double kGsEps = 1e-12;

namespace detail {

// The checks of one op's arguments; every message names the op.
class ArgChecks {
 public:
  explicit ArgChecks(const char* op) : op_(op) {}

  template <typename... What>
  void operator()(bool ok, const char* arg, const What&... what) const {
    TORCH_CHECK_VALUE(ok, "fpl_fast::", op_, ": ", arg, " ", what...);
  }
  void shape(bool ok, const at::Tensor& t, const char* arg) const {
    (*this)(ok, arg, "has shape ", t.sizes());
  }
  void rank(const at::Tensor& t, const char* arg, std::initializer_list<int64_t> dims) const {
    shape(std::find(dims.begin(), dims.end(), t.dim()) != dims.end(), t, arg);
  }
  void dtype(const at::Tensor& t, const char* arg, c10::ScalarType want) const {
    (*this)(t.scalar_type() == want, arg, "has dtype ", t.scalar_type(), ", expected ", want);
  }
  void floating(const at::Tensor& t, const char* arg) const {
    (*this)(at::isFloatingType(t.scalar_type()), arg, "has dtype ", t.scalar_type(), ", not floating point");
  }
  void device(const at::Tensor& t, const char* arg, c10::Device want) const {
    (*this)(t.device() == want, arg, "is on ", t.device(), ", expected ", want);
  }
  // For the CUDA kernels, on the tensor whose device the others were checked against.
  void cuda(const at::Tensor& t, const char* arg) const {
    (*this)(t.is_cuda(), arg, "is on ", t.device(), ", expected a CUDA device");
  }
  // Same device and dtype as ref.
  void like(const at::Tensor& ref, const at::Tensor& t, const char* arg) const {
    device(t, arg, ref.device());
    dtype(t, arg, ref.scalar_type());
  }
  // One Philox stream (seed, offset) per client, each entry in [0, 2^63) (the upper bound holds by type).
  void streams(c10::IntArrayRef seed, c10::IntArrayRef offset, int64_t K) const {
    for (const auto& [xs, arg] : {std::make_pair(seed, "seed"), std::make_pair(offset, "offset")}) {
      (*this)(static_cast<int64_t>(xs.size()) == K, arg, "has ", xs.size(), " entries for ", K, " clients");
      for (const int64_t x : xs) (*this)(x >= 0, arg, "has a negative entry ", x);
    }
  }

 private:
  const char* op_;
};

}  // namespace detail

// ------------------------------------------------------------------------------------------------
// lowrank_prompt
// ------------------------------------------------------------------------------------------------
struct LowrankPromptDims {
  bool batched;  // output has the client dimension K
  int64_t K, n_cls, n_ctx, S, d, r;
  bool has_uv, has_residual;
  // Whether g, u, v, residual carry their own K (else they broadcast over clients).
  bool g_batched, u_batched, v_batched, residual_batched;
  int64_t L() const { return 1 + n_ctx + S; }
};

inline LowrankPromptDims check_lowrank_prompt(const at::Tensor& prefix, const at::Tensor& suffix,
                                              const at::Tensor& g, const std::optional<at::Tensor>& u,
                                              const std::optional<at::Tensor>& v,
                                              const std::optional<at::Tensor>& residual) {
  const detail::ArgChecks check("lowrank_prompt");
  check.rank(prefix, "prefix", {3});
  check.floating(prefix, "prefix");
  check.rank(suffix, "suffix", {3});
  check.rank(g, "g", {2, 3});
  check.like(prefix, suffix, "suffix");
  check.like(prefix, g, "g");
  LowrankPromptDims dims{};
  dims.n_cls = prefix.size(0);
  dims.d = prefix.size(2);
  dims.n_ctx = g.size(-2);
  dims.S = suffix.size(1);
  check.shape(prefix.size(1) == 1, prefix, "prefix");
  check.shape(suffix.size(0) == dims.n_cls && suffix.size(2) == dims.d, suffix, "suffix");
  check.shape(g.size(-1) == dims.d, g, "g");
  check(u.has_value() == v.has_value(), "u, v", "given one without the other");
  dims.has_uv = u.has_value();
  if (dims.has_uv) {
    check.rank(*u, "u", {2, 3});
    check.rank(*v, "v", {2, 3});
    check.like(prefix, *u, "u");
    check.like(prefix, *v, "v");
    dims.r = u->size(-1);
    check.shape(u->size(-2) == dims.n_ctx, *u, "u");
    check.shape(v->size(-2) == dims.r && v->size(-1) == dims.d, *v, "v");
  }
  dims.has_residual = residual.has_value();
  if (dims.has_residual) {
    check.rank(*residual, "residual", {2, 3});
    check.like(prefix, *residual, "residual");
    check.shape(residual->size(-2) == dims.n_ctx && residual->size(-1) == dims.d, *residual, "residual");
  }
  dims.g_batched = g.dim() == 3;
  dims.u_batched = dims.has_uv && u->dim() == 3;
  dims.v_batched = dims.has_uv && v->dim() == 3;
  dims.residual_batched = dims.has_residual && residual->dim() == 3;
  std::vector<int64_t> leading;
  if (dims.g_batched) leading.push_back(g.size(0));
  if (dims.u_batched) leading.push_back(u->size(0));
  if (dims.v_batched) leading.push_back(v->size(0));
  if (dims.residual_batched) leading.push_back(residual->size(0));
  const bool agree = std::all_of(leading.begin(), leading.end(), [&](int64_t k) { return k == leading[0]; });
  check(agree, "g, u, v, residual", "disagree in the client dimension K: ", c10::IntArrayRef(leading));
  dims.batched = !leading.empty();
  dims.K = dims.batched ? leading[0] : 1;
  return dims;
}

// ------------------------------------------------------------------------------------------------
// lowrank_prompt_backward
// ------------------------------------------------------------------------------------------------
struct LowrankPromptBackwardDims {
  int64_t K, n_cls, L, n_ctx, d, r;
  bool has_uv;  // both u and v given (else the factor gradients are empty)
  bool u_batched, v_batched;
};

inline LowrankPromptBackwardDims check_lowrank_prompt_backward(const at::Tensor& grad_out,
                                                               const std::optional<at::Tensor>& u,
                                                               const std::optional<at::Tensor>& v,
                                                               int64_t n_ctx) {
  const detail::ArgChecks check("lowrank_prompt_backward");
  check.rank(grad_out, "grad_out", {3, 4});
  check.floating(grad_out, "grad_out");
  LowrankPromptBackwardDims dims{};
  dims.K = grad_out.dim() == 4 ? grad_out.size(0) : 1;
  dims.n_cls = grad_out.size(-3);
  dims.L = grad_out.size(-2);
  dims.d = grad_out.size(-1);
  check(0 <= n_ctx && 1 + n_ctx <= dims.L, "n_ctx", "= ", n_ctx, ", outside [0, ", dims.L - 1, "]");
  dims.n_ctx = n_ctx;
  dims.has_uv = u.has_value() && v.has_value();
  if (dims.has_uv) {
    for (const auto& [t, arg] : {std::make_pair(&*u, "u"), std::make_pair(&*v, "v")}) {
      check.rank(*t, arg, {2, 3});
      check.device(*t, arg, grad_out.device());
      check.floating(*t, arg);
      check.shape(t->dim() == 2 || t->size(0) == dims.K, *t, arg);
    }
    dims.r = u->size(-1);
    check.shape(u->size(-2) == n_ctx, *u, "u");
    check.shape(v->size(-2) == dims.r && v->size(-1) == dims.d, *v, "v");
    dims.u_batched = u->dim() == 3;
    dims.v_batched = v->dim() == 3;
  }
  return dims;
}

// ------------------------------------------------------------------------------------------------
// dp_lowrank_clip_noise
// ------------------------------------------------------------------------------------------------
struct DpClipNoiseDims {
  bool batched;                      // grad has the client dimension K
  int64_t K, b, n_cls, n_ctx, d, r;  // n_cls = 1 without sum_classes; r = 0 without u, v
  bool has_uv;
  double denom;  // expected_batch_size if > 0 else max(b, 1)
  // Normals drawn per client: n_ctx r + r d, or n_ctx d without u, v.
  int64_t noise_per_client() const { return has_uv ? n_ctx * r + r * d : n_ctx * d; }
};

// clip_norm: float64 on grad's device, (K, 3) ((3,) without K), read by the kernels per client; its values
// (> 0, finite with noise) are fpl_fast/ops/checks.py's to check.
inline DpClipNoiseDims check_dp_lowrank_clip_noise(const at::Tensor& grad, const std::optional<at::Tensor>& u,
                                                   const std::optional<at::Tensor>& v,
                                                   const at::Tensor& clip_norm, c10::IntArrayRef seed,
                                                   c10::IntArrayRef offset, double expected_batch_size,
                                                   bool sum_classes) {
  const detail::ArgChecks check("dp_lowrank_clip_noise");
  const int64_t plain = sum_classes ? 4 : 3;
  check.rank(grad, "grad", {plain, plain + 1});
  check.floating(grad, "grad");
  DpClipNoiseDims dims{};
  dims.batched = grad.dim() == plain + 1;
  dims.K = dims.batched ? grad.size(0) : 1;
  dims.b = grad.size(dims.batched ? 1 : 0);
  dims.n_cls = sum_classes ? grad.size(-3) : 1;
  dims.n_ctx = grad.size(-2);
  dims.d = grad.size(-1);
  check.streams(seed, offset, dims.K);
  check.dtype(clip_norm, "clip_norm", c10::ScalarType::Double);
  check.device(clip_norm, "clip_norm", grad.device());
  check.shape(dims.batched ? clip_norm.dim() == 2 && clip_norm.size(0) == dims.K && clip_norm.size(1) == 3
                           : clip_norm.dim() == 1 && clip_norm.size(0) == 3,
              clip_norm, "clip_norm");
  check(u.has_value() == v.has_value(), "u, v", "given one without the other");
  dims.has_uv = u.has_value();
  if (dims.has_uv) {
    const int64_t kd = dims.batched ? 3 : 2;
    check.rank(*u, "u", {kd});
    check.rank(*v, "v", {kd});
    check.like(grad, *u, "u");
    check.like(grad, *v, "v");
    dims.r = u->size(-1);
    const int64_t uk = dims.batched ? u->size(0) : 1, vk = dims.batched ? v->size(0) : 1;
    check.shape(uk == dims.K && u->size(-2) == dims.n_ctx, *u, "u");
    check.shape(vk == dims.K && v->size(-2) == dims.r && v->size(-1) == dims.d, *v, "v");
  }
  dims.denom =
      expected_batch_size > 0 ? expected_batch_size : static_cast<double>(std::max<int64_t>(dims.b, 1));
  return dims;
}

// ------------------------------------------------------------------------------------------------
// lowrank_full_grad
// ------------------------------------------------------------------------------------------------
struct FullGradDims {
  bool batched;
  int64_t K, n_ctx, r, d;
};

inline FullGradDims check_lowrank_full_grad(const at::Tensor& grad_u, const at::Tensor& grad_v,
                                            const at::Tensor& u, const at::Tensor& v) {
  const detail::ArgChecks check("lowrank_full_grad");
  check.rank(u, "u", {2, 3});
  check.floating(u, "u");
  for (const auto& [t, arg] :
       {std::make_pair(&grad_u, "grad_u"), std::make_pair(&grad_v, "grad_v"), std::make_pair(&v, "v")}) {
    check.rank(*t, arg, {u.dim()});
    check.like(u, *t, arg);
  }
  FullGradDims dims{};
  dims.batched = u.dim() == 3;
  dims.K = dims.batched ? u.size(0) : 1;
  dims.n_ctx = u.size(-2);
  dims.r = u.size(-1);
  dims.d = v.size(-1);
  check.shape(grad_u.sizes() == u.sizes(), grad_u, "grad_u");
  check.shape(v.size(-2) == dims.r && (!dims.batched || v.size(0) == dims.K), v, "v");
  check.shape(grad_v.sizes() == v.sizes(), grad_v, "grad_v");
  return dims;
}

// ------------------------------------------------------------------------------------------------
// lowrank_factorize
// ------------------------------------------------------------------------------------------------
struct FactorizeDims {
  bool batched;
  int64_t K, n_ctx, d, r;
};

inline FactorizeDims check_lowrank_factorize(const at::Tensor& l, int64_t rank, c10::IntArrayRef seed,
                                             c10::IntArrayRef offset) {
  const detail::ArgChecks check("lowrank_factorize");
  check.rank(l, "l", {2, 3});
  check.floating(l, "l");
  FactorizeDims dims{};
  dims.batched = l.dim() == 3;
  dims.K = dims.batched ? l.size(0) : 1;
  dims.n_ctx = l.size(-2);
  dims.d = l.size(-1);
  const int64_t max_rank = std::min(dims.n_ctx, dims.d);
  check(1 <= rank && rank <= max_rank, "rank", "= ", rank, ", outside [1, ", max_rank, "]");
  check.streams(seed, offset, dims.K);
  dims.r = rank;
  return dims;
}

// ------------------------------------------------------------------------------------------------
// nn_map
// ------------------------------------------------------------------------------------------------
struct NnMapDims {
  int64_t B, V, d;
  bool has_allowed;
};

// The last check reads allowed (on CUDA it synchronises): with no id allowed there is no index to return.
inline NnMapDims check_nn_map(const at::Tensor& y, const at::Tensor& emb,
                              const std::optional<at::Tensor>& allowed, int64_t chunk) {
  const detail::ArgChecks check("nn_map");
  check(chunk >= 1, "chunk", "= ", chunk, ", below 1");
  check.rank(y, "y", {2});
  check.floating(y, "y");
  check.rank(emb, "emb", {2});
  check.like(y, emb, "emb");
  check.shape(emb.size(1) == y.size(1), emb, "emb");
  const NnMapDims dims{y.size(0), emb.size(0), y.size(1), allowed.has_value()};
  if (dims.has_allowed) {
    check.shape(allowed->dim() == 1 && allowed->size(0) == dims.V, *allowed, "allowed");
    check.dtype(*allowed, "allowed", c10::ScalarType::Bool);
    check.device(*allowed, "allowed", y.device());
  }
  const int64_t n_allowed = dims.has_allowed ? allowed->sum().item<int64_t>() : dims.V;
  check(n_allowed > 0, "allowed", "admits none of the ", dims.V, " ids");
  return dims;
}

// ------------------------------------------------------------------------------------------------
// dp_output_clip_noise
// ------------------------------------------------------------------------------------------------
struct OutputDpDims {
  int64_t K, b, n_cls, D;
  bool has_mask;
};

// The last check reads labels (on CUDA it synchronises): each label indexes a row of text_feats.
inline OutputDpDims check_dp_output_clip_noise(const at::Tensor& image_feats, const at::Tensor& text_feats,
                                               const at::Tensor& labels,
                                               const std::optional<at::Tensor>& mask,
                                               const at::Tensor& clip_norm, c10::IntArrayRef seed,
                                               c10::IntArrayRef offset) {
  const detail::ArgChecks check("dp_output_clip_noise");
  check.rank(image_feats, "image_feats", {3});
  check.rank(text_feats, "text_feats", {3});
  check.floating(text_feats, "text_feats");
  check.like(text_feats, image_feats, "image_feats");
  const OutputDpDims dims{image_feats.size(0), image_feats.size(1), text_feats.size(1), image_feats.size(2),
                          mask.has_value()};
  const int64_t K = dims.K, b = dims.b;
  check.shape(text_feats.size(0) == K && text_feats.size(2) == dims.D && dims.n_cls >= 1, text_feats,
              "text_feats");
  const std::vector<int64_t> kb{K, b};
  check.dtype(labels, "labels", c10::ScalarType::Long);
  check.device(labels, "labels", text_feats.device());
  check.shape(labels.sizes() == c10::IntArrayRef(kb), labels, "labels");
  if (dims.has_mask) {
    check.like(text_feats, *mask, "mask");
    check.shape(mask->sizes() == c10::IntArrayRef(kb), *mask, "mask");
  }
  check.dtype(clip_norm, "clip_norm", c10::ScalarType::Float);
  check.device(clip_norm, "clip_norm", text_feats.device());
  check.shape(clip_norm.dim() == 1 && clip_norm.size(0) == K, clip_norm, "clip_norm");
  check.streams(seed, offset, K);
  if (K > 0 && b > 0) {
    check(labels.ge(0).logical_and(labels.lt(dims.n_cls)).all().item<bool>(), "labels",
          "has entries outside [0, ", dims.n_cls, ")");
  }
  return dims;
}

}  // namespace fpl_fast
