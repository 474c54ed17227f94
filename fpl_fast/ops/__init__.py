"""Python face of the fpl_fast custom ops.

Loads the compiled extension ``fpl_fast._C`` (which registers ``torch.ops.fpl_fast.*`` for CPU and,
when built, CUDA), adds fake (meta) kernels and autograd formulas, and falls back to the
plain-PyTorch twins in :mod:`fpl_fast.ops.reference` with one warning when ``_C`` is missing or was built against
another torch. Inputs are checked by :mod:`fpl_fast.ops.checks` before a kernel runs (by the fake kernels while
tracing), so a bad input raises the same ValueError on every path. Each op's kernel checks itself against the
reference the first time it runs eagerly on a device type and is replaced by the reference there if it disagrees
(:mod:`fpl_fast.ops.first_use_check`). Semantics, shapes and the noise stream of every op are documented in
:mod:`fpl_fast.ops.reference`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from fpl_fast.ops import checks, first_use_check, reference

__all__ = [
    "has_cpp_ops",
    "has_cuda_kernels",
    "cpu_isa",
    "lowrank_prompt",
    "dp_lowrank_clip_noise",
    "lowrank_full_grad",
    "lowrank_factorize",
    "dp_output_clip_noise",
    "lowrank_prompt_traceable",
    "philox_normal",
    "dp_noise_numel",
    "factorize_noise_numel",
    "output_noise_numel",
    "NORM_EPS",
    "NN_MAP_CHUNK",
    "CLIP_EPS",
]

# The noise-stream layout and the thresholds the kernels share with their spec (the training code reads them
# here, never from the test oracle directly).
philox_normal = reference.philox_normal
dp_noise_numel = reference.dp_noise_numel
factorize_noise_numel = reference.factorize_noise_numel
output_noise_numel = reference.output_noise_numel
NORM_EPS = reference.NORM_EPS
NN_MAP_CHUNK = reference.NN_MAP_CHUNK
CLIP_EPS = reference.CLIP_EPS
# The prompt assembly in plain PyTorch: torch.func.vmap over the per-sample pull-back cannot see through a
# custom op's autograd, so the per-sample path assembles the prompt with ordinary tensor ops.
lowrank_prompt_traceable = reference.lowrank_prompt

_REBUILD = "Build the extension against the installed torch with `pip install --no-build-isolation .`."


def _built_torch_mismatch(ext) -> str | None:
    """Why ``ext`` (the loaded ``_C``) must not be used with the running torch, or None if it may.

    pip's default (isolated) build compiles against whatever torch it puts in its build environment, which need
    not be the torch that runs. ``_C.torch_version()`` is that build's ``torch.__version__`` (only the release
    number when built without setup.py).
    """
    built = str(ext.torch_version())
    running = torch.__version__ if "+" in built else torch.__version__.split("+")[0]
    if built == running:
        return None
    return f"it was built against torch {built} but torch {torch.__version__} is running"


_C: ModuleType | None  # None: not loaded, or not used (built against another torch)
try:
    from fpl_fast import _C  # noqa: F401  (loading it registers torch.ops.fpl_fast)

    _HAS_C = True
    _mismatch = _built_torch_mismatch(_C)
except ImportError as exc:  # pragma: no cover - exercised by the fallback test in a subprocess
    _C = None
    _HAS_C = False
    _mismatch = None
    if "cannot import name '_C'" in str(exc):
        _why = "it is not built"
    elif "undefined symbol" in str(exc):
        _why = f"{exc}: it was probably built against another torch"
    else:
        _why = str(exc)
    warnings.warn(
        f"fpl_fast._C could not be loaded ({_why}); using the plain-PyTorch reference ops. {_REBUILD}",
        RuntimeWarning,
        stacklevel=2,
    )
if _mismatch is not None:
    # The library is loaded (its ops stay registered with the dispatcher) but none of it is used.
    _C = None
    _HAS_C = False
    warnings.warn(
        f"fpl_fast._C is not used ({_mismatch}); using the plain-PyTorch reference ops. {_REBUILD}",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpp_ops() -> bool:
    """True when the compiled C++ ops are loaded (else the reference runs)."""
    return _HAS_C


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return _HAS_C and _C is not None and bool(_C.cuda_built())


def cpu_isa() -> str:
    """The instruction-set level the CPU kernels run: ``"avx512"``, ``"avx2"`` or ``"default"``, chosen when
    ``_C`` loads from ``FPL_FAST_CPU_ISA``, else ``ATEN_CPU_CAPABILITY`` (the same names), else the best the CPU
    supports (a request above it is clamped down); ``"reference"`` when ``_C`` is missing."""
    return str(_C.cpu_isa()) if _HAS_C and _C is not None else "reference"


# ----------------------------------------------------------------------------------------------
# Fake kernels: the reference computes the right shapes and dtypes on fake tensors.
# ----------------------------------------------------------------------------------------------
def _contiguous(out):
    if isinstance(out, tuple):
        return tuple(t.contiguous() for t in out)
    return out.contiguous()


if _HAS_C:

    @torch.library.register_fake("fpl_fast::lowrank_prompt")
    def _lowrank_prompt_fake(prefix, suffix, g, u, v, residual):
        return _contiguous(reference.lowrank_prompt(prefix, suffix, g, u, v, residual))

    @torch.library.register_fake("fpl_fast::lowrank_prompt_backward")
    def _lowrank_prompt_backward_fake(grad_out, u, v, n_ctx):
        return _contiguous(reference.lowrank_prompt_backward(grad_out, u, v, n_ctx))

    @torch.library.register_fake("fpl_fast::dp_lowrank_clip_noise")
    def _dp_fake(grad, u, v, clip_norm, *rest):
        # Shapes only (the clip norm values need real data).
        checks.check_dp_lowrank_clip_noise(grad, u, v, clip_norm, *rest, values=False)
        per_sample, sum_classes = rest[5], rest[6]
        batched = grad.dim() == (5 if sum_classes else 4)
        lead = (grad.shape[0],) if batched else ()
        b = grad.shape[1] if batched else grad.shape[0]
        n_ctx, d = grad.shape[-2], grad.shape[-1]
        r = None if u is None else u.shape[-1]
        local_a = grad.new_empty(*lead, n_ctx, d if r is None else r)
        local_b = grad.new_empty(*lead, 0 if r is None else r, d)
        glob = grad.new_empty(*lead, n_ctx, d)
        norms = grad.new_empty(*lead, b if per_sample else 1, 3, dtype=torch.float32)
        return local_a, local_b, glob, norms

    @torch.library.register_fake("fpl_fast::lowrank_full_grad")
    def _full_grad_fake(grad_u, grad_v, u, v, scale):
        return _contiguous(reference.lowrank_full_grad(grad_u, grad_v, u, v, scale))

    @torch.library.register_fake("fpl_fast::lowrank_factorize")
    def _factorize_fake(l, rank, seed, offset):  # noqa: E741
        checks.check_lowrank_factorize(l, rank, seed, offset)
        u = l.new_empty(*l.shape[:-1], rank)
        v = l.new_empty(*l.shape[:-2], rank, l.shape[-1])
        return u, v, torch.empty_like(l, memory_format=torch.contiguous_format)

    # ------------------------------------------------------------------------------------------
    # Autograd
    # ------------------------------------------------------------------------------------------
    def _lowrank_prompt_setup(ctx, inputs, output):
        prefix, suffix, g, u, v, residual = inputs
        ctx.save_for_backward(u, v)
        ctx.n_ctx = g.shape[-2]
        ctx.batched = output.dim() == 4
        ctx.dims = tuple(None if t is None else t.dim() for t in (g, u, v, residual))

    def _reduce_k(grad: Tensor, dim_of_input: int | None, plain_dims: int) -> Tensor | None:
        """Sum the per-client gradient over K for an input that was shared (had no K)."""
        if dim_of_input is None:
            return None
        return grad if dim_of_input == plain_dims + 1 else grad.sum(0)

    def _lowrank_prompt_backward(ctx, grad_out):
        u, v = ctx.saved_tensors
        grad_ctx, grad_u, grad_v = torch.ops.fpl_fast.lowrank_prompt_backward(grad_out.contiguous(), u, v, ctx.n_ctx)
        g_dim, u_dim, v_dim, r_dim = ctx.dims
        go = grad_out if ctx.batched else grad_out.unsqueeze(0)
        need = ctx.needs_input_grad
        g_prefix = go[:, :, :1].sum(0) if need[0] else None
        g_suffix = go[:, :, 1 + ctx.n_ctx :].sum(0) if need[1] else None
        return (
            g_prefix,
            g_suffix,
            _reduce_k(grad_ctx, g_dim, 2) if need[2] else None,
            _reduce_k(grad_u, u_dim, 2) if need[3] else None,
            _reduce_k(grad_v, v_dim, 2) if need[4] else None,
            _reduce_k(grad_ctx, r_dim, 2) if need[5] else None,
        )

    torch.library.register_autograd(
        "fpl_fast::lowrank_prompt", _lowrank_prompt_backward, setup_context=_lowrank_prompt_setup
    )

    # Double backward (create_graph=True through lowrank_prompt): the backward op is bilinear in
    # (grad_out, u, v), so its own backward is taken from the reference by torch.func.vjp; only
    # higher-order gradients pay the reference's speed.
    def _prompt_bwd_setup(ctx, inputs, output):
        grad_out, u, v, n_ctx = inputs
        ctx.save_for_backward(grad_out, u, v)
        ctx.n_ctx = n_ctx

    def _prompt_bwd_backward(ctx, d_ctx, d_u, d_v):
        grad_out, u, v = ctx.saved_tensors
        has_uv = u is not None and v is not None

        def fn(go: Tensor, *uv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            u_, v_ = uv if has_uv else (None, None)
            return reference.lowrank_prompt_backward(go, u_, v_, ctx.n_ctx)

        pull = torch.func.vjp(fn, grad_out, *((u, v) if has_uv else ()))[1]  # (output, vjp_fn): no has_aux
        grads = pull((d_ctx, d_u, d_v))
        return grads[0], grads[1] if has_uv else None, grads[2] if has_uv else None, None

    torch.library.register_autograd(
        "fpl_fast::lowrank_prompt_backward", _prompt_bwd_backward, setup_context=_prompt_bwd_setup
    )

    def _full_grad_setup(ctx, inputs, output):
        grad_u, grad_v, u, v, scale = inputs
        ctx.save_for_backward(grad_u, grad_v, u, v)
        ctx.scale = scale

    def _full_grad_backward(ctx, grad):
        # out = s (gU V + U gV + U U^T gU V); grad is dL/d out.
        gu, gv, u, v = ctx.saved_tensors
        s = ctx.scale
        ut = u.transpose(-1, -2)
        vt = v.transpose(-1, -2)
        g_vt = torch.matmul(grad, vt)  # (K, n_ctx, r)
        ut_g = torch.matmul(ut, grad)  # (K, r, d)
        d_gu = s * (g_vt + torch.matmul(u, torch.matmul(ut, g_vt)))
        d_gv = s * ut_g
        d_u = s * (
            torch.matmul(grad, gv.transpose(-1, -2))
            + torch.matmul(g_vt, torch.matmul(gu.transpose(-1, -2), u))
            + torch.matmul(torch.matmul(gu, v), torch.matmul(grad.transpose(-1, -2), u))
        )
        gut = gu.transpose(-1, -2)
        d_v = s * (torch.matmul(gut, grad) + torch.matmul(torch.matmul(gut, u), ut_g))
        return d_gu, d_gv, d_u, d_v, None

    torch.library.register_autograd("fpl_fast::lowrank_full_grad", _full_grad_backward, setup_context=_full_grad_setup)


# ----------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------
# Each checks its inputs (fpl_fast.ops.checks) before the kernel runs; under torch.compile the fake kernels check
# them instead, and the reference twins check their own.
def lowrank_prompt(
    prefix: Tensor,
    suffix: Tensor,
    g: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """[prefix | G + U V (+ R) | suffix] for every class (and client); see the reference."""
    if _HAS_C and first_use_check.use_kernel("lowrank_prompt", g, prefix, suffix, u, v, residual):
        if not torch.compiler.is_compiling():
            checks.check_lowrank_prompt(prefix, suffix, g, u, v, residual)
        return torch.ops.fpl_fast.lowrank_prompt(prefix, suffix, g, u, v, residual)
    return reference.lowrank_prompt(prefix, suffix, g, u, v, residual)


def dp_lowrank_clip_noise(
    grad: Tensor,
    u: Tensor | None = None,
    v: Tensor | None = None,
    *,
    clip_norm: float | Tensor,
    noise_multiplier: float,
    seed: Sequence[int],
    offset: Sequence[int],
    expected_batch_size: float = 0.0,
    joint_uv: bool = True,
    per_sample: bool = True,
    sum_classes: bool = False,
    normalize: bool = False,
    stability: float = 0.01,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused per-sample clipping + local-DP noise of the prompt factors; see the reference.

    ``clip_norm``: a float (every client, every quantity), a (K,) or (K, 1) tensor (one C per client) or the
    full (K, 3) tensor of the clip norms of g_U (g_L without u, v), g_V and g_G per client ((3,) without K);
    with ``joint_uv`` column 1 is ignored. It is passed to the op as float32 on grad's device.
    ``normalize``: automatic clipping, each per-example term scaled by C / (norm + ``stability``) (per-sample
    mode only). ``seed`` and ``offset`` hold one Philox stream per client (K integers each; 1 without K)."""
    seed, offset = _ints(seed), _ints(offset)
    clip = reference.dp_clip_norms(clip_norm, grad, bool(sum_classes))
    args = (
        grad,
        u,
        v,
        clip,
        float(noise_multiplier),
        seed,
        offset,
        float(expected_batch_size),
        bool(joint_uv),
        bool(per_sample),
        bool(sum_classes),
        bool(normalize),
        float(stability),
    )
    if _HAS_C and first_use_check.use_kernel("dp_lowrank_clip_noise", grad, u, v, clip):
        if not torch.compiler.is_compiling():
            checks.check_dp_lowrank_clip_noise(*args, values=not first_use_check.tracing((grad, u, v, clip)))
        return torch.ops.fpl_fast.dp_lowrank_clip_noise(*args)
    return reference.dp_lowrank_clip_noise(*args)


def lowrank_full_grad(grad_u: Tensor, grad_v: Tensor, u: Tensor, v: Tensor, scale: float = 0.1) -> Tensor:
    """g_L = scale (g_U V + U g_V + U U^T g_U V); see the reference."""
    if _HAS_C and first_use_check.use_kernel("lowrank_full_grad", grad_u, grad_v, u, v):
        if not torch.compiler.is_compiling():
            checks.check_lowrank_full_grad(grad_u, grad_v, u, v, float(scale))
        return torch.ops.fpl_fast.lowrank_full_grad(grad_u, grad_v, u, v, float(scale))
    return reference.lowrank_full_grad(grad_u, grad_v, u, v, float(scale))


def lowrank_factorize(
    l: Tensor,  # noqa: E741
    rank: int,
    seed: Sequence[int],
    offset: Sequence[int],
) -> tuple[Tensor, Tensor, Tensor]:
    """One randomised power iteration L -> (U, V, R = L - U V), one stream per client; see the reference."""
    seed, offset = _ints(seed), _ints(offset)
    if _HAS_C and first_use_check.use_kernel("lowrank_factorize", l):
        if not torch.compiler.is_compiling():
            checks.check_lowrank_factorize(l, int(rank), seed, offset)
        return torch.ops.fpl_fast.lowrank_factorize(l, int(rank), seed, offset)
    return reference.lowrank_factorize(l, int(rank), seed, offset)


def _ints(xs: Sequence[int]) -> Sequence[int]:
    """A per-client stream list as a list of plain ints (numpy integers too); anything else is left for the
    op's check to name."""
    if isinstance(xs, (list, tuple)):
        return [int(x) if isinstance(x, (int, np.integer)) and not isinstance(x, bool) else x for x in xs]
    return xs


# ----------------------------------------------------------------------------------------------
# dp_output_clip_noise (output-space per-example DP)
# ----------------------------------------------------------------------------------------------
if _HAS_C:

    @torch.library.register_fake("fpl_fast::dp_output_clip_noise")
    def _output_dp_fake(image_feats, text_feats, labels, mask, logit_scale, clip_norm, *rest):
        # Shapes only (the label range and the clip norm values need real data).
        checks.check_dp_output_clip_noise(
            image_feats, text_feats, labels, mask, logit_scale, clip_norm, *rest, values=False
        )
        K, b = image_feats.shape[0], image_feats.shape[1]
        release = torch.empty_like(text_feats, memory_format=torch.contiguous_format)
        norms = image_feats.new_empty(K, b, dtype=torch.float32)
        return release, norms, torch.empty_like(norms)


def dp_output_clip_noise(
    image_feats: Tensor,
    text_feats: Tensor,
    labels: Tensor,
    mask: Tensor | None = None,
    *,
    logit_scale: float,
    clip_norm: Tensor,
    noise_multiplier: float,
    seed: Sequence[int],
    offset: Sequence[int],
    denominator: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example clipping of the logit head's cotangents in closed form, their sum and one Gaussian draw per
    client, divided by the denominator; see the reference. Returns (release, norms, losses)."""
    seed, offset = _ints(seed), _ints(offset)
    args = (
        image_feats,
        text_feats,
        labels,
        mask,
        float(logit_scale),
        clip_norm,
        float(noise_multiplier),
        seed,
        offset,
        float(denominator),
    )
    tensors = (image_feats, text_feats, labels, mask, clip_norm)
    if _HAS_C and first_use_check.use_kernel("dp_output_clip_noise", *tensors):
        if not torch.compiler.is_compiling():
            checks.check_dp_output_clip_noise(*args, values=not first_use_check.tracing(tensors))
        return torch.ops.fpl_fast.dp_output_clip_noise(*args)
    return reference.dp_output_clip_noise(*args)


# ----------------------------------------------------------------------------------------------
# nn_map (RAPT's nearest-token search)
# ----------------------------------------------------------------------------------------------
__all__ += ["nn_map"]

if _HAS_C:

    @torch.library.register_fake("fpl_fast::nn_map")
    def _nn_map_fake(y, emb, allowed, chunk):
        checks.check_nn_map(y, emb, allowed, chunk, values=False)  # whether any id is allowed needs real data
        return y.new_empty(y.shape[0], dtype=torch.int64)


def nn_map(y: Tensor, emb: Tensor, allowed: Tensor | None = None, *, chunk: int = reference.NN_MAP_CHUNK) -> Tensor:
    """argmin_w ||emb[w] - y[i]|| over allowed ids, blockwise, ties to the smaller id; see the reference."""
    if _HAS_C and first_use_check.use_kernel("nn_map", y, emb, allowed):
        if not torch.compiler.is_compiling():
            checks.check_nn_map(y, emb, allowed, int(chunk), values=not first_use_check.tracing((y, emb, allowed)))
        return torch.ops.fpl_fast.nn_map(y, emb, allowed, int(chunk))
    return reference.nn_map(y, emb, allowed, int(chunk))
