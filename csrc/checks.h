// Input validation shared by the CPU and CUDA backends.
//
// Every user-facing precondition of fpl_fast/reference.py is checked here, in the same order, through
// TORCH_CHECK_VALUE so that Python sees a ValueError like the reference's. The wording names the same
// argument and condition ("prefix must be 3-D (n_cls, 1, d), got shape ..."); the values after "got" are
// printed by c10 (sizes "[2, 3]", dtypes "Float", devices "cpu", numbers "1e-05"), not as Python prints them.
// The check_* functions return the resolved dimensions. Header-only, no CUDA includes.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace fpl_fast {

// Clip factor min(1, C / (norm + CLIP_EPS)) and the Gram-Schmidt guard, as fpl_fast/reference.py.
constexpr double kClipEps = 1e-6;
constexpr double kGsEps = 1e-12;

namespace detail {

inline void check_dim(const at::Tensor& t, const char* name, std::initializer_list<int64_t> dims,
                      const std::string& what) {
  const bool ok = std::find(dims.begin(), dims.end(), t.dim()) != dims.end();
  TORCH_CHECK_VALUE(ok, name, " must be ", what, ", got shape ", t.sizes());
}

// Same device and dtype as ref (reference.py's _check_same).
inline void check_same(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " must have dtype ", ref.scalar_type(),
                    ", got ", t.scalar_type());
}

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(at::isFloatingType(t.scalar_type()), name, " must be floating point, got ",
                    t.scalar_type());
}

inline void check_hyper(double clip_norm, double noise_multiplier) {
  TORCH_CHECK_VALUE(!std::isnan(clip_norm) && clip_norm > 0,
                    "clip_norm must be > 0 (inf disables clipping), got ", clip_norm);
  TORCH_CHECK_VALUE(std::isfinite(noise_multiplier) && noise_multiplier >= 0,
                    "noise_multiplier must be finite and >= 0, got ", noise_multiplier);
}

// One Philox stream (seed, offset) per client, each entry in [0, 2^63) (reference.py's _check_streams). The
// upper bound holds by type: an int[] argument is int64.
inline void check_streams(c10::IntArrayRef seed, c10::IntArrayRef offset, int64_t K) {
  for (const auto& [xs, name] : {std::make_pair(seed, "seed"), std::make_pair(offset, "offset")}) {
    TORCH_CHECK_VALUE(static_cast<int64_t>(xs.size()) == K, name, " must be a list of ", K,
                      " integers (one stream per client), got ", xs);
    for (const int64_t x : xs) {
      TORCH_CHECK_VALUE(x >= 0, name, " entries must be integers in [0, 2^63), got ", x);
    }
  }
}

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
  using detail::check_dim;
  check_dim(prefix, "prefix", {3}, "3-D (n_cls, 1, d)");
  check_dim(suffix, "suffix", {3}, "3-D (n_cls, S, d)");
  check_dim(g, "g", {2, 3}, "2-D (n_ctx, d) or 3-D (K, n_ctx, d)");
  LowrankPromptDims dims{};
  dims.n_cls = prefix.size(0);
  dims.d = prefix.size(2);
  TORCH_CHECK_VALUE(prefix.size(1) == 1, "prefix must have one token per class (n_cls, 1, d), got ",
                    prefix.sizes());
  TORCH_CHECK_VALUE(suffix.size(0) == dims.n_cls && suffix.size(2) == dims.d, "suffix must be (", dims.n_cls,
                    ", S, ", dims.d, ") to match prefix, got ", suffix.sizes());
  dims.n_ctx = g.size(-2);
  TORCH_CHECK_VALUE(g.size(-1) == dims.d, "g must have width ", dims.d, " to match prefix, got ", g.sizes());
  TORCH_CHECK_VALUE(u.has_value() == v.has_value(), "u and v must be given together or not at all");
  detail::check_same(prefix, suffix, "suffix");
  detail::check_same(prefix, g, "g");
  if (u.has_value()) detail::check_same(prefix, *u, "u");
  if (v.has_value()) detail::check_same(prefix, *v, "v");
  if (residual.has_value()) detail::check_same(prefix, *residual, "residual");
  dims.has_uv = u.has_value();
  dims.r = 0;
  if (dims.has_uv) {
    check_dim(*u, "u", {2, 3}, "2-D (n_ctx, r) or 3-D (K, n_ctx, r)");
    check_dim(*v, "v", {2, 3}, "2-D (r, d) or 3-D (K, r, d)");
    dims.r = u->size(-1);
    TORCH_CHECK_VALUE(u->size(-2) == dims.n_ctx, "u must have ", dims.n_ctx, " rows (n_ctx), got ",
                      u->sizes());
    TORCH_CHECK_VALUE(v->size(-2) == dims.r && v->size(-1) == dims.d, "v must be (", dims.r, ", ", dims.d,
                      ") per client, got ", v->sizes());
  }
  dims.has_residual = residual.has_value();
  if (dims.has_residual) {
    check_dim(*residual, "residual", {2, 3}, "2-D (n_ctx, d) or 3-D (K, n_ctx, d)");
    TORCH_CHECK_VALUE(residual->size(-2) == dims.n_ctx && residual->size(-1) == dims.d, "residual must be (",
                      dims.n_ctx, ", ", dims.d, ") per client, got ", residual->sizes());
  }
  dims.g_batched = g.dim() == 3;
  dims.u_batched = dims.has_uv && u->dim() == 3;
  dims.v_batched = dims.has_uv && v->dim() == 3;
  dims.residual_batched = dims.has_residual && residual->dim() == 3;
  std::vector<int64_t> leading;  // in argument order, as the reference lists them
  if (dims.g_batched) leading.push_back(g.size(0));
  if (dims.u_batched) leading.push_back(u->size(0));
  if (dims.v_batched) leading.push_back(v->size(0));
  if (dims.residual_batched) leading.push_back(residual->size(0));
  const bool agree = std::all_of(leading.begin(), leading.end(), [&](int64_t k) { return k == leading[0]; });
  TORCH_CHECK_VALUE(agree,
                    "client dimensions K disagree across g, u, v, residual: ", c10::IntArrayRef(leading));
  dims.batched = !leading.empty();
  dims.K = dims.batched ? leading[0] : 1;
  dims.S = suffix.size(1);
  // Not in the reference (which would also assemble integer prompts): the kernels are floating point only.
  detail::check_floating(prefix, "prefix");
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
  detail::check_dim(grad_out, "grad_out", {3, 4}, "3-D (n_cls, L, d) or 4-D (K, n_cls, L, d)");
  LowrankPromptBackwardDims dims{};
  const bool batched = grad_out.dim() == 4;
  dims.K = batched ? grad_out.size(0) : 1;
  dims.n_cls = grad_out.size(-3);
  dims.L = grad_out.size(-2);
  dims.d = grad_out.size(-1);
  TORCH_CHECK_VALUE(0 <= n_ctx && 1 + n_ctx <= dims.L, "n_ctx must be in [0, ", dims.L - 1, "], got ", n_ctx);
  dims.n_ctx = n_ctx;
  // Not in the reference (where matmul would raise): the kernels need floating point and matching factors.
  detail::check_floating(grad_out, "grad_out");
  dims.has_uv = u.has_value() && v.has_value();
  dims.r = 0;
  if (dims.has_uv) {
    detail::check_dim(*u, "u", {2, 3}, "2-D (n_ctx, r) or 3-D (K, n_ctx, r)");
    detail::check_dim(*v, "v", {2, 3}, "2-D (r, d) or 3-D (K, r, d)");
    for (const auto& [t, name] : {std::make_pair(&*u, "u"), std::make_pair(&*v, "v")}) {
      TORCH_CHECK_VALUE(t->device() == grad_out.device(), name, " must be on ", grad_out.device(), ", got ",
                        t->device());
      detail::check_floating(*t, name);
      TORCH_CHECK_VALUE(t->dim() == 2 || t->size(0) == dims.K, name,
                        " must have grad_out's client dimension ", dims.K, ", got shape ", t->sizes());
    }
    dims.r = u->size(-1);
    TORCH_CHECK_VALUE(u->size(-2) == n_ctx, "u must have ", n_ctx, " rows (n_ctx), got ", u->sizes());
    TORCH_CHECK_VALUE(v->size(-2) == dims.r && v->size(-1) == dims.d, "v must be (", dims.r, ", ", dims.d,
                      ") per client, got ", v->sizes());
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

inline DpClipNoiseDims check_dp_lowrank_clip_noise(const at::Tensor& grad, const std::optional<at::Tensor>& u,
                                                   const std::optional<at::Tensor>& v, double clip_norm,
                                                   double noise_multiplier, c10::IntArrayRef seed,
                                                   c10::IntArrayRef offset, double expected_batch_size,
                                                   bool sum_classes) {
  detail::check_hyper(clip_norm, noise_multiplier);
  TORCH_CHECK_VALUE(std::isfinite(expected_batch_size) && expected_batch_size >= 0,
                    "expected_batch_size must be finite and >= 0 (0: use b), got ", expected_batch_size);
  const int64_t plain = sum_classes ? 4 : 3;
  const std::string what =
      sum_classes ? "(b, n_cls, n_ctx, d) or (K, b, n_cls, n_ctx, d)" : "(b, n_ctx, d) or (K, b, n_ctx, d)";
  detail::check_dim(grad, "grad", {plain, plain + 1},
                    std::to_string(plain) + "-D or " + std::to_string(plain + 1) + "-D " + what);
  detail::check_floating(grad, "grad");
  DpClipNoiseDims dims{};
  dims.batched = grad.dim() == plain + 1;
  dims.K = dims.batched ? grad.size(0) : 1;
  dims.b = grad.size(dims.batched ? 1 : 0);
  dims.n_cls = sum_classes ? grad.size(-3) : 1;
  dims.n_ctx = grad.size(-2);
  dims.d = grad.size(-1);
  detail::check_streams(seed, offset, dims.K);
  TORCH_CHECK_VALUE(u.has_value() == v.has_value(), "u and v must be given together or not at all");
  dims.has_uv = u.has_value();
  dims.r = 0;
  if (dims.has_uv) {
    const int64_t kd = dims.batched ? 3 : 2;
    detail::check_dim(*u, "u", {kd},
                      dims.batched ? "3-D (K, n_ctx, r) like grad" : "2-D (n_ctx, r) like grad");
    detail::check_dim(*v, "v", {kd}, dims.batched ? "3-D (K, r, d) like grad" : "2-D (r, d) like grad");
    detail::check_same(grad, *u, "u");
    detail::check_same(grad, *v, "v");
    dims.r = u->size(-1);
    const int64_t uk = dims.batched ? u->size(0) : 1;
    TORCH_CHECK_VALUE(uk == dims.K && u->size(-2) == dims.n_ctx, "u must be (", dims.K, ", ", dims.n_ctx,
                      ", r) to match grad, got ", u->sizes());
    const int64_t vk = dims.batched ? v->size(0) : 1;
    TORCH_CHECK_VALUE(vk == dims.K && v->size(-2) == dims.r && v->size(-1) == dims.d, "v must be (", dims.K,
                      ", ", dims.r, ", ", dims.d, ") to match grad and u, got ", v->sizes());
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
                                            const at::Tensor& u, const at::Tensor& v, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), "scale must be finite, got ", scale);
  detail::check_dim(u, "u", {2, 3}, "2-D (n_ctx, r) or 3-D (K, n_ctx, r)");
  const std::string like_u = std::to_string(u.dim()) + "-D like u";
  for (const auto& [t, name] :
       {std::make_pair(&grad_u, "grad_u"), std::make_pair(&grad_v, "grad_v"), std::make_pair(&v, "v")}) {
    detail::check_dim(*t, name, {u.dim()}, like_u);
    detail::check_same(u, *t, name);
  }
  TORCH_CHECK_VALUE(grad_u.sizes() == u.sizes(), "grad_u must have u's shape ", u.sizes(), ", got ",
                    grad_u.sizes());
  const int64_t r = u.size(-1);
  TORCH_CHECK_VALUE(v.size(-2) == r, "v must have ", r, " rows (rank of u), got ", v.sizes());
  TORCH_CHECK_VALUE(v.sizes().slice(0, v.dim() - 2) == u.sizes().slice(0, u.dim() - 2),
                    "v must have u's client dimension ", u.sizes().slice(0, u.dim() - 2), ", got ",
                    v.sizes());
  TORCH_CHECK_VALUE(grad_v.sizes() == v.sizes(), "grad_v must have v's shape ", v.sizes(), ", got ",
                    grad_v.sizes());
  // Not in the reference: the kernels are floating point only.
  detail::check_floating(u, "u");
  FullGradDims dims{};
  dims.batched = u.dim() == 3;
  dims.K = dims.batched ? u.size(0) : 1;
  dims.n_ctx = u.size(-2);
  dims.r = r;
  dims.d = v.size(-1);
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
  detail::check_dim(l, "l", {2, 3}, "2-D (n_ctx, d) or 3-D (K, n_ctx, d)");
  detail::check_floating(l, "l");
  FactorizeDims dims{};
  dims.batched = l.dim() == 3;
  dims.K = dims.batched ? l.size(0) : 1;
  dims.n_ctx = l.size(-2);
  dims.d = l.size(-1);
  const int64_t max_rank = std::min(dims.n_ctx, dims.d);
  TORCH_CHECK_VALUE(1 <= rank && rank <= max_rank, "rank must be in [1, ", max_rank,
                    "] (min(n_ctx, d)), got ", rank);
  detail::check_streams(seed, offset, dims.K);
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

// Shape/dtype/device checks of nn_map (reference.py's nn_map). That at least one id is allowed is
// data-dependent and checked by the kernels themselves.
inline NnMapDims check_nn_map(const at::Tensor& y, const at::Tensor& emb,
                              const std::optional<at::Tensor>& allowed, int64_t chunk) {
  TORCH_CHECK_VALUE(chunk >= 1, "chunk must be >= 1 (vocabulary rows per block), got ", chunk);
  detail::check_dim(y, "y", {2}, "2-D (B, d)");
  detail::check_dim(emb, "emb", {2}, "2-D (V, d)");
  detail::check_floating(y, "y");
  detail::check_same(y, emb, "emb");
  TORCH_CHECK_VALUE(emb.size(1) == y.size(1), "emb must have width ", y.size(1), " to match y, got shape ",
                    emb.sizes());
  NnMapDims dims{y.size(0), emb.size(0), y.size(1), allowed.has_value()};
  if (allowed.has_value()) {
    TORCH_CHECK_VALUE(allowed->dim() == 1 && allowed->size(0) == dims.V, "allowed must be 1-D (", dims.V,
                      ",) like emb's rows, got shape ", allowed->sizes());
    TORCH_CHECK_VALUE(allowed->scalar_type() == c10::ScalarType::Bool, "allowed must have dtype ",
                      c10::ScalarType::Bool, ", got ", allowed->scalar_type());
    TORCH_CHECK_VALUE(allowed->device() == y.device(), "allowed must be on ", y.device(), ", got ",
                      allowed->device());
  }
  return dims;
}

// ------------------------------------------------------------------------------------------------
// dp_output_clip_noise
// ------------------------------------------------------------------------------------------------
struct OutputDpDims {
  int64_t K, b, n_cls, D;
  bool has_mask;
};

// All checks of reference.py's dp_output_clip_noise, in its order. The last ones (label range, clip norm
// values) read the data: on CUDA they synchronise, as the reference's bool() does.
inline OutputDpDims check_dp_output_clip_noise(const at::Tensor& image_feats, const at::Tensor& text_feats,
                                               const at::Tensor& labels,
                                               const std::optional<at::Tensor>& mask, double logit_scale,
                                               const at::Tensor& clip_norm, double noise_multiplier,
                                               c10::IntArrayRef seed, c10::IntArrayRef offset,
                                               double denominator) {
  TORCH_CHECK_VALUE(std::isfinite(noise_multiplier) && noise_multiplier >= 0,
                    "noise_multiplier must be finite and >= 0, got ", noise_multiplier);
  TORCH_CHECK_VALUE(std::isfinite(logit_scale) && logit_scale > 0, "logit_scale must be finite and > 0, got ",
                    logit_scale);
  TORCH_CHECK_VALUE(std::isfinite(denominator) && denominator > 0, "denominator must be finite and > 0, got ",
                    denominator);
  detail::check_dim(image_feats, "image_feats", {3}, "3-D (K, b, D)");
  detail::check_dim(text_feats, "text_feats", {3}, "3-D (K, n_cls, D)");
  detail::check_floating(text_feats, "text_feats");
  detail::check_same(text_feats, image_feats, "image_feats");
  OutputDpDims dims{image_feats.size(0), image_feats.size(1), text_feats.size(1), image_feats.size(2),
                    mask.has_value()};
  const int64_t K = dims.K, b = dims.b;
  TORCH_CHECK_VALUE(text_feats.size(0) == K && text_feats.size(2) == dims.D, "text_feats must be (", K,
                    ", n_cls, ", dims.D, ") to match image_feats, got ", text_feats.sizes());
  TORCH_CHECK_VALUE(dims.n_cls >= 1, "text_feats must hold at least one class, got n_cls=0");
  TORCH_CHECK_VALUE(labels.scalar_type() == c10::ScalarType::Long, "labels must have dtype ",
                    c10::ScalarType::Long, ", got ", labels.scalar_type());
  TORCH_CHECK_VALUE(labels.device() == text_feats.device(), "labels must be on ", text_feats.device(),
                    ", got ", labels.device());
  const std::vector<int64_t> kb{K, b};
  TORCH_CHECK_VALUE(labels.sizes() == c10::IntArrayRef(kb), "labels must have shape (", K, ", ", b,
                    ") to match image_feats, got ", labels.sizes());
  if (mask.has_value()) {
    detail::check_same(text_feats, *mask, "mask");
    TORCH_CHECK_VALUE(mask->sizes() == c10::IntArrayRef(kb), "mask must have shape (", K, ", ", b,
                      ") to match image_feats, got ", mask->sizes());
  }
  TORCH_CHECK_VALUE(clip_norm.scalar_type() == c10::ScalarType::Float, "clip_norm must have dtype ",
                    c10::ScalarType::Float, ", got ", clip_norm.scalar_type());
  TORCH_CHECK_VALUE(clip_norm.device() == text_feats.device(), "clip_norm must be on ", text_feats.device(),
                    ", got ", clip_norm.device());
  TORCH_CHECK_VALUE(clip_norm.dim() == 1 && clip_norm.size(0) == K, "clip_norm must have shape (", K,
                    ",) (one per client), got ", clip_norm.sizes());
  detail::check_streams(seed, offset, K);
  if (K > 0 && b > 0) {
    TORCH_CHECK_VALUE(labels.ge(0).logical_and(labels.lt(dims.n_cls)).all().item<bool>(),
                      "labels must lie in [0, ", dims.n_cls, ") (the classes of text_feats)");
  }
  if (K > 0) {
    const at::Tensor c = clip_norm.cpu().contiguous();
    const float* cp = c.data_ptr<float>();
    const c10::ArrayRef<float> values(cp, static_cast<size_t>(K));
    bool positive = true, finite = true;
    for (int64_t k = 0; k < K; ++k) {
      positive = positive && !std::isnan(cp[k]) && cp[k] > 0;
      finite = finite && std::isfinite(cp[k]);
    }
    TORCH_CHECK_VALUE(positive, "clip_norm entries must be > 0 (inf disables clipping), got ", values);
    TORCH_CHECK_VALUE(
        noise_multiplier == 0 || finite,
        "clip_norm entries must be finite when noise_multiplier > 0 (the noise std is sigma C), got ",
        values);
  }
  return dims;
}

}  // namespace fpl_fast
