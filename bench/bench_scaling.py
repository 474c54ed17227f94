"""How one fpl_fast training step scales with the number of clients, classes and the batch size.

One axis at a time is varied around a base point (clients 10, classes 10, batch 32, class names of 2 words by
default), for ``clip_mode="batch"`` (one backward of the batch mean) and ``clip_mode="sample"`` (per-sample
gradients: b vector-Jacobian products through the text encoder), each on the text paths of ``--text-paths``
(``shared``: the prompt prefix once per client, each class on its own name tokens; ``full``: every class prompt
whole). The ``classes`` and ``name_words`` axes show how the shared path's gain grows with the class count and the
class-name length; every record holds the token rows per client through each layer. Image features are random
(the image encoder is not part of a step: fpl_fast caches the features) and classes beyond the model's own are
made-up names, which is fine for timing. Each point is
:meth:`fpl_fast.federated.engine.Federation.train_step` of all clients with server averaging (sync="step"),
median over ``--steps`` steps after ``--warmup`` untimed ones.

Usage, from the repository root::

    python bench/bench_scaling.py --quick --json runs/bench_scaling.json --plot runs/bench_scaling.png
    python bench/bench_scaling.py --device cuda --model ViT-B-16 --pretrained None --chunk-size 8 \\
        --json scaling_cuda.json --plot scaling_cuda.png

``--quick`` trims the grid to what two CPU cores do in a few minutes (clients 10/20/50, classes 10/30/100,
batch 8/32/128, name words 1/2/6). ``--json`` writes ``{"device", "model", "base", "records": [{"axis", "clients",
"classes", "batch", "name_words", "mode", "text_path", "rows_per_client", "s_per_step", "peak_mem_bytes",
"error"}]}``. Benchmarks never assert anything about timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from bench_round import PRECISIONS, made_up_classnames, resolve_precision  # noqa: E402
    from provenance import provenance  # noqa: E402

    from fpl_fast import ops  # noqa: E402
    from fpl_fast.backbone.loading import load_backbone  # noqa: E402
    from fpl_fast.backbone.model import FrozenCLIP  # noqa: E402
    from fpl_fast.config import RunConfig  # noqa: E402
    from fpl_fast.federated.engine import ClientData, Federation  # noqa: E402

__all__ = ["AXES", "MODES", "QUICK_AXES", "TEXT_PATHS", "classnames", "main", "time_point"]

AXES: dict[str, list[int]] = {
    "clients": [10, 50, 100],
    "classes": [10, 100, 1000],
    "batch": [8, 32, 128],
    "name_words": [1, 2, 6, 12],
}
QUICK_AXES: dict[str, list[int]] = {
    "clients": [10, 20, 50],
    "classes": [10, 30, 100],
    "batch": [8, 32, 128],
    "name_words": [1, 2, 6],
}
MODES = ("batch", "sample")
TEXT_PATHS = ("shared", "full")


def classnames(n: int, words: int) -> list[str]:
    """n made-up class names of ``words`` words each (2: :func:`made_up_classnames`; others cycle its words)."""
    names = made_up_classnames(n)
    if words == 2:
        return names
    return [" ".join((name.split() * words)[:words]) for name in names]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _federation(
    backbone: FrozenCLIP,
    *,
    clients: int,
    classes: int,
    batch: int,
    mode: str,
    device: torch.device,
    chunk: int | None,
    name_words: int = 2,
    text_path: str = "shared",
) -> Federation:
    """A federation with random image features: 2 batches of training data per client."""
    gen = torch.Generator().manual_seed(0)
    n_train = clients * 2 * batch
    D = backbone.embed_dim
    data = ClientData(
        train_feats=torch.randn(n_train, D, generator=gen),
        train_labels=torch.randint(0, classes, (n_train,), generator=gen),
        test_feats=torch.randn(clients, D, generator=gen),
        test_labels=torch.randint(0, classes, (clients,), generator=gen),
        train_idx=[np.asarray(ix) for ix in np.array_split(np.arange(n_train), clients)],
        test_idx=[np.asarray(ix) for ix in np.array_split(np.arange(clients), clients)],
    )
    cfg = RunConfig(
        factorization="dpfpl",
        noise=1.0,
        norm_thresh=10.0,
        clip_mode=mode,
        num_users=clients,
        batch_size=batch,
        lr=0.001,
        sync="step",
        device=str(device),
        chunk_size=chunk,
        text_path=text_path,
    )
    names = classnames(classes, name_words)
    return Federation(cfg, backbone, names, data, noise_local=1.0, noise_global=1.0)


def time_point(
    backbone: FrozenCLIP, *, device: torch.device, steps: int, warmup: int, **point: Any
) -> tuple[float, int | None, int]:
    """Median seconds per step, the CUDA peak memory (None on the CPU) and the token rows per client of one point
    (``point``: the keyword arguments of :func:`_federation` but the backbone and the device)."""
    fed = _federation(backbone, device=device, **point)
    active = torch.arange(fed.cfg.num_users, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fed.train_step(active, server_average=True)
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fed.train_step(active, server_average=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    return statistics.median(times), peak, fed.text.rows_per_client


def _plot(records: list[dict[str, Any]], axes: dict[str, list[int]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, panels = plt.subplots(1, len(axes), figsize=(4.2 * len(axes), 3.6), squeeze=False)
    for ax, axis in zip(panels[0], axes, strict=True):
        for mode, marker in zip(MODES, ("o", "s"), strict=True):
            for text_path, style in zip(TEXT_PATHS, ("-", "--"), strict=True):
                pts = [
                    r
                    for r in records
                    if r["axis"] == axis
                    and r["mode"] == mode
                    and r["text_path"] == text_path
                    and r["s_per_step"] is not None
                ]
                if pts:
                    x = [r[axis] for r in pts]
                    y = [r["s_per_step"] for r in pts]
                    ax.plot(x, y, style, marker=marker, label=f"{mode}, {text_path} path")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(axis)
        ax.set_ylabel("seconds per step")
        ax.set_title(f"varying {axis}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--model", default="tiny-digits-clip", help="open_clip model (default: the embedded tiny)")
    parser.add_argument("--pretrained", default="embedded", help="weights ('None': random init)")
    parser.add_argument("--quick", action="store_true", help="a grid two CPU cores finish in a few minutes")
    parser.add_argument("--base", default="10,10,32", help="base point clients,classes,batch (default 10,10,32)")
    parser.add_argument("--modes", default="batch,sample", help="comma-separated subset of batch,sample")
    parser.add_argument("--text-paths", default="shared,full", help="comma-separated subset of shared,full")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per point (default 3, quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per point")
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="per-sample chunk (bounds memory; default: sized to activations)"
    )
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto", help="frozen encoders (auto: bf16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    parser.add_argument("--plot", type=Path, default=None, help="write a log-log PNG, one panel per axis")
    args = parser.parse_args(argv)
    try:
        base_vals = [int(x) for x in args.base.split(",")]
    except ValueError:
        base_vals = []
    if len(base_vals) != 3 or min(base_vals) < 1:
        parser.error(f"--base must be three integers >= 1 (clients,classes,batch), got {args.base!r}")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        parser.error(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    paths = [p.strip() for p in args.text_paths.split(",") if p.strip()]
    if not paths or any(p not in TEXT_PATHS for p in paths):
        parser.error(
            f"--text-paths must be a comma-separated subset of {','.join(TEXT_PATHS)}, got {args.text_paths!r}"
        )
    if args.steps is None:
        args.steps = 2 if args.quick else 3
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    if args.chunk_size is not None and args.chunk_size < 1:
        parser.error(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    device = torch.device(args.device)
    pretrained = None if args.pretrained in ("None", "none", "") else args.pretrained
    base = {**dict(zip(("clients", "classes", "batch"), base_vals, strict=True)), "name_words": 2}
    axes = {k: sorted(set(v) | {base[k]}) for k, v in (QUICK_AXES if args.quick else AXES).items()}

    precision = resolve_precision(args.precision, args.device)
    backbone = load_backbone(args.model, pretrained, precision=precision, device=device)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, model {args.model} "
        f"({precision}), "
        f"fpl_fast._C loaded: {ops.has_cpp_ops()}; base {base}; axes {axes}"
    )
    records: list[dict[str, Any]] = []
    done: dict[tuple[Any, ...], dict[str, Any]] = {}
    print(
        f"{'axis':10s} {'clients':>7s} {'classes':>7s} {'batch':>5s} {'words':>5s} {'mode':>6s} {'path':>6s} "
        f"{'rows':>6s} {'ms/step':>10s} {'wall s':>7s}"
    )
    fields = ("s_per_step", "peak_mem_bytes", "rows_per_client", "error")
    for axis, values in axes.items():
        for value in values:
            point = {**base, axis: value}
            for mode in modes:
                for path in paths:
                    key = (*point.values(), mode, path)
                    rec: dict[str, Any] = {"axis": axis, **point, "mode": mode, "text_path": path}
                    t0 = time.perf_counter()
                    if key in done:  # the base point is on every axis: time it once
                        rec.update({k: done[key][k] for k in fields})
                    else:
                        try:
                            sec, peak, rows = time_point(
                                backbone,
                                **point,
                                mode=mode,
                                device=device,
                                steps=args.steps,
                                warmup=args.warmup,
                                chunk=args.chunk_size,
                                text_path=path,
                            )
                            rec.update(s_per_step=sec, peak_mem_bytes=peak, rows_per_client=rows, error=None)
                        except (RuntimeError, MemoryError) as exc:  # out of memory at a large point: report, go on
                            err = str(exc).splitlines()[0][:200]
                            rec.update(s_per_step=None, peak_mem_bytes=None, rows_per_client=None, error=err)
                        done[key] = rec
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                    records.append(rec)
                    ms = "-" if rec["s_per_step"] is None else f"{rec['s_per_step'] * 1e3:10.1f}"
                    rows_s = "-" if rec["rows_per_client"] is None else str(rec["rows_per_client"])
                    print(
                        f"{axis:10s} {point['clients']:7d} {point['classes']:7d} {point['batch']:5d} "
                        f"{point['name_words']:5d} {mode:>6s} {path:>6s} {rows_s:>6s} {ms:>10s} "
                        f"{time.perf_counter() - t0:7.1f}" + (f"  ERROR {rec['error']}" if rec["error"] else ""),
                        flush=True,
                    )
    result = {
        "device": args.device,
        "model": args.model,
        "pretrained": pretrained,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "base": base,
        "axes": axes,
        "steps": args.steps,
        "chunk_size": args.chunk_size,
        "precision": precision,
        "text_paths": paths,
        "records": records,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**provenance(__file__, argv), **result}, indent=1) + "\n")
        print(f"wrote {args.json}")
    if args.plot is not None:
        _plot(records, axes, args.plot, f"fpl_fast step time, {args.model} on {args.device}, base {base}")
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
