// All fpl_fast op schemas, in one place. Kernels live in cpu/<op>_cpu.cpp and cuda/<op>_cuda.cu,
// each registering with TORCH_LIBRARY_IMPL(fpl_fast, CPU|CUDA, m). Semantics: fpl_fast/ops/reference/.
#include <torch/library.h>

#ifdef TORCH_EXTENSION_NAME
#include <torch/extension.h>

#include "cpu/cpu_isa.h"
#endif

TORCH_LIBRARY(fpl_fast, m) {
  m.def(
      "lowrank_prompt(Tensor prefix, Tensor suffix, Tensor g, Tensor? u, Tensor? v, Tensor? residual) "
      "-> Tensor");
  m.def(
      "lowrank_prompt_backward(Tensor grad_out, Tensor? u, Tensor? v, int n_ctx) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "dp_lowrank_clip_noise(Tensor grad, Tensor? u, Tensor? v, Tensor clip_norm, float noise_multiplier, "
      "int[] seed, int[] offset, float expected_batch_size, bool joint_uv, bool per_sample, "
      "bool sum_classes, bool normalize, float stability) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("lowrank_full_grad(Tensor grad_u, Tensor grad_v, Tensor u, Tensor v, float scale) -> Tensor");
  m.def("lowrank_factorize(Tensor l, int rank, int[] seed, int[] offset) -> (Tensor, Tensor, Tensor)");
  m.def("nn_map(Tensor y, Tensor emb, Tensor? allowed, int chunk) -> Tensor");
  m.def(
      "dp_output_clip_noise(Tensor image_feats, Tensor text_feats, Tensor labels, Tensor? mask, float "
      "logit_scale, "
      "Tensor clip_norm, float noise_multiplier, int[] seed, int[] offset, float denominator) "
      "-> (Tensor, Tensor, Tensor)");
}

#ifdef TORCH_EXTENSION_NAME
// Build information only; the ops are reached through torch.ops.fpl_fast.*.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def("cuda_built", []() {
#ifdef FPL_FAST_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  module.def("cpu_isa", []() { return std::string(fpl_fast::cpu::cpu_isa_name(fpl_fast::cpu::cpu_isa())); });
  // The torch version this extension was built against (setup.py passes torch.__version__ as bare tokens);
  // fpl_fast.ops refuses to use the kernels under another torch.
#define FPL_FAST_STR_(x) #x
#define FPL_FAST_STR(x) FPL_FAST_STR_(x)
#ifdef FPL_FAST_TORCH_VERSION
  module.def("torch_version", []() { return std::string(FPL_FAST_STR(FPL_FAST_TORCH_VERSION)); });
#else
  module.def("torch_version", []() { return std::string(TORCH_VERSION); });
#endif
}
#endif
