"""The one skeleton every federated method follows: ``setup(cfg) -> state``, ``round(state, rnd) -> record`` per
round, ``final(state) -> summary``, driven by :func:`run_method`.

The driver owns what used to be re-done per method: the round loop, the progress bar, the timing, the checkpoints,
the outputs (results.json, rounds.csv, accuracy.png through :func:`fpl_fast.outputs.write_outputs`) and the optional
TensorBoard log (:mod:`fpl_fast.tracking`). Every method's results.json therefore has one shape, ``{"method",
"config", "rounds", "final"}`` with ``method`` first, and every round record one clock: ``seconds_elapsed``, the
run's wall seconds from its start to the end of that round (set-up included; a resumed run's earlier processes
counted), so a record means the same whether a method records every round or, like DP-FPL with ``eval_every``,
some. A method's state is its own business (a dataclass of whatever its rounds need); the driver never looks inside.

Two optional protocols serve methods with longer runs (DP-FPL): :class:`Resumable` (a checkpoint after every round,
``resume`` and ``stop_after_round``) and :class:`OwnsProgress` (a bar that ticks inside a round, not per round).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from tqdm.auto import tqdm

from fpl_fast import outputs, tracking
from fpl_fast.outputs import ROUND_FIELDS, results_dict, write_outputs

__all__ = ["Method", "MethodConfig", "OwnsProgress", "Resumable", "run_method"]

S = TypeVar("S")
S_in = TypeVar("S_in", contravariant=True)  # the optional protocols only take a state


class MethodConfig(Protocol):
    """What the driver reads from a method's Config: the number of rounds and a JSON-ready dict of the fields."""

    @property
    def rounds(self) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...


class Method(Protocol[S]):
    """A federated method, as the driver sees it.

    Attributes:
        name: the ``--method`` name, written first in results.json.
        postfix: keys of a round record shown on the driver's progress bar.
        curves: keys of a round record that accuracy.png draws (of :data:`fpl_fast.outputs.CURVES`): a method with
            one global model has no neighbour curve (it would be the same model on the other clients' splits).
    """

    @property
    def name(self) -> str: ...

    @property
    def postfix(self) -> tuple[str, ...]: ...

    @property
    def curves(self) -> tuple[str, ...]: ...

    def setup(self, cfg: Any) -> S:
        """Load the backbone and data, split them over the clients, build the initial global state."""
        ...

    def round(self, state: S, rnd: int) -> dict[str, Any] | None:
        """Run round ``rnd`` (1-based), updating ``state``; return its record (accuracies, epsilons, losses...),
        or None for a round that records nothing (one that is not evaluated)."""
        ...

    def final(self, state: S) -> dict[str, Any]:
        """The run's summary after the last round (``local_acc``, ``neighbor_acc``, epsilons, ...)."""
        ...


@runtime_checkable
class Resumable(Protocol[S_in]):
    """A method whose state the driver checkpoints after every round (``out/checkpoint.pt``), so that a run cut
    short continues with ``resume=True`` to exactly the results of an uninterrupted one.

    The checkpoint holds ``config`` (a resumed run must agree on it), ``rounds`` (the records so far),
    ``next_round`` (the number of rounds done), ``elapsed`` (the run's seconds so far) and the method's own keys,
    so that ``seconds_elapsed`` and the final ``seconds`` count the processes before a resume too.
    """

    def state_dict(self, state: S_in) -> dict[str, Any]:
        """The keys that restore ``state`` (with the RNGs) in :meth:`load_state_dict`, added to the checkpoint."""
        ...

    def load_state_dict(self, state: S_in, saved: dict[str, Any]) -> None:
        """Bring a freshly set-up ``state`` to the checkpoint ``saved``."""
        ...


@runtime_checkable
class OwnsProgress(Protocol[S_in]):
    """A method whose rounds are long: it opens the progress bar, ticks it inside a round (per local step) and
    sets its postfix itself; the driver only closes it."""

    def progress(self, state: S_in, rounds: range, *, enabled: bool) -> tqdm:
        """The run's bar for ``rounds`` (those left to run); ``enabled=False`` shows nothing."""
        ...


def _row(rnd: int, record: dict[str, Any], seconds_elapsed: float) -> dict[str, Any]:
    """``record`` with the shared columns first (those of rounds.csv, in its order), then the method's own."""
    row: dict[str, Any] = {"round": rnd}
    for key in ROUND_FIELDS[1:]:
        if key == "seconds_elapsed":
            row[key] = seconds_elapsed
        elif key in record:
            row[key] = record[key]
    row.update((k, v) for k, v in record.items() if k not in row)
    return row


def _show(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def run_method(
    method: Method[Any],
    cfg: MethodConfig,
    *,
    out: Path,
    progress: bool = True,
    resume: bool = False,
    stop_after_round: int | None = None,
    tensorboard: str | Path | None = None,
) -> dict[str, Any]:
    """Run ``method`` for ``cfg.rounds`` rounds and write its outputs to ``out`` (created).

    Args:
        resume: continue from the checkpoint in ``out`` (a :class:`Resumable` method only).
        stop_after_round: end early after this round, as if interrupted, writing no outputs (tests resume).
        tensorboard: also log every round record to TensorBoard event files in this folder
            (:mod:`fpl_fast.tracking`; needs the tensorboard package).

    Returns:
        The results dict ``{"method", "config", "rounds", "final"}``; ``final["seconds"]`` is the whole run's
        wall time, each round's ``seconds_elapsed`` the run's wall time at the end of that round.
        A stopped run has ``final`` None and ``stopped_after`` the last round run.
    """
    t_start = time.perf_counter()
    out = Path(out)
    resumable = isinstance(method, Resumable)
    if resumable:
        outputs.check_out_dir(out, resume=resume)  # never over a previous run's files; resume needs a checkpoint
    elif resume:
        raise ValueError(f"--resume: {method.name} writes no checkpoints, so it cannot be resumed")
    saved = outputs.load_checkpoint(out) if resume else None
    if saved is not None and saved["config"] != cfg.to_dict():
        raise ValueError(f"--resume: the checkpoint in {out} was written with a different configuration")
    done = saved["next_round"] if saved is not None else 0
    log = None
    if tensorboard is not None:  # before the set-up loads anything: a refused folder costs nothing
        log = tracking.open_round_log(tensorboard, method=method.name, config=cfg.to_dict(), first_round=done + 1)
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _rounds(method, cfg, out, saved, log, t_start=t_start, progress=progress, stop=stop_after_round)
    finally:
        if log is not None:
            log.close()


def _rounds(
    method: Method[Any],
    cfg: MethodConfig,
    out: Path,
    saved: dict[str, Any] | None,
    log: tracking.RoundLog | None,
    *,
    t_start: float,
    progress: bool,
    stop: int | None,
) -> dict[str, Any]:
    """:func:`run_method` from the set-up on: the rounds after ``saved``'s (None: all), then the outputs."""
    state = method.setup(cfg)
    rounds: list[dict[str, Any]] = []
    done, elapsed_before = 0, 0.0
    if saved is not None and isinstance(method, Resumable):
        method.load_state_dict(state, saved)
        rounds, done, elapsed_before = saved["rounds"], saved["next_round"], saved["elapsed"]

    def clock() -> float:
        return round(elapsed_before + time.perf_counter() - t_start, 3)

    todo = range(done + 1, cfg.rounds + 1)
    own_bar = isinstance(method, OwnsProgress)
    if isinstance(method, OwnsProgress):
        bar = method.progress(state, todo, enabled=progress)
    else:
        bar = tqdm(total=len(todo), desc=method.name, unit="round", disable=not progress, dynamic_ncols=True)
    try:
        for rnd in todo:
            record = method.round(state, rnd)
            if record is not None:
                rounds.append(_row(rnd, record, clock()))
                if not own_bar:
                    bar.set_postfix({k: _show(record[k]) for k in method.postfix if k in record})
            if not own_bar:
                bar.update()
            if isinstance(method, Resumable):
                ckpt = {"config": cfg.to_dict(), **method.state_dict(state), "rounds": rounds, "next_round": rnd}
                outputs.save_checkpoint(out, {**ckpt, "elapsed": elapsed_before + time.perf_counter() - t_start})
            if log is not None and record is not None:  # after the checkpoint: a resume purges what follows it
                log.write(rounds[-1], extra=_columns(method))
            if stop is not None and stop <= rnd < cfg.rounds:
                return results_dict(method.name, cfg.to_dict(), rounds, None, stopped_after=rnd)
    finally:
        bar.close()
    final = method.final(state)
    final["seconds"] = clock()
    results = results_dict(method.name, cfg.to_dict(), rounds, final)
    write_outputs(out, results, curves=method.curves, columns=_columns(method))
    return results


def _columns(method: Method[Any]) -> tuple[str, ...]:
    """The method's round-record keys beyond the shared ones that rounds.csv and the TensorBoard log also carry
    (DP-FPL: its protocol's metrics, known once it is set up); none by default."""
    return tuple(getattr(method, "columns", ()))
