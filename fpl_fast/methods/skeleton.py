"""The one skeleton every federated method follows: ``setup(cfg) -> state``, ``round(state, rnd) -> record`` per
round, ``final(state) -> summary``, driven by :func:`run_method`.

The driver owns what used to be re-done per method: the round loop, the progress bar, the timing and the outputs
(results.json, rounds.csv, accuracy.png through :func:`fpl_fast.results.write_outputs`). Every method's
results.json therefore has one shape, ``{"method", "config", "rounds", "final"}`` with ``method`` first.
A method's state is its own business (a dataclass of whatever its rounds need); the driver never looks inside.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

from fpl_fast.results import ROUND_FIELDS, results_dict, write_outputs

__all__ = ["Method", "MethodConfig", "run_method"]

S = TypeVar("S")


class MethodConfig(Protocol):
    """What the driver reads from a method's Config: the number of rounds and a JSON-ready dict of the fields."""

    @property
    def rounds(self) -> int: ...

    def to_dict(self) -> dict[str, Any]: ...


class Method(Protocol[S]):
    """A federated method, as the driver sees it.

    Attributes:
        name: the ``--method`` name, written first in results.json.
        postfix: keys of a round record shown on the progress bar.
    """

    name: str
    postfix: tuple[str, ...]

    def setup(self, cfg: Any) -> S:
        """Load the backbone and data, split them over the clients, build the initial global state."""
        ...

    def round(self, state: S, rnd: int) -> dict[str, Any]:
        """Run round ``rnd`` (1-based), updating ``state``; return its record (accuracies, epsilons, losses...)."""
        ...

    def final(self, state: S) -> dict[str, Any]:
        """The run's summary after the last round (``local_acc``, ``neighbor_acc``, epsilons, ...)."""
        ...


def _row(rnd: int, record: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``record`` with the shared columns first (those of rounds.csv, in its order), then the method's own."""
    row: dict[str, Any] = {"round": rnd}
    for key in ROUND_FIELDS[1:]:
        if key == "seconds":
            row["seconds"] = seconds
        elif key in record:
            row[key] = record[key]
    row.update((k, v) for k, v in record.items() if k not in row)
    return row


def _show(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def run_method(method: Method[Any], cfg: MethodConfig, *, out: Path, progress: bool = True) -> dict[str, Any]:
    """Run ``method`` for ``cfg.rounds`` rounds and write its outputs to ``out`` (created).

    Returns:
        The results dict ``{"method", "config", "rounds", "final"}``; ``final["seconds"]`` is the whole run's
        wall time, each round's ``seconds`` that round's.
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = method.setup(cfg)
    rounds: list[dict[str, Any]] = []
    bar = tqdm(range(1, cfg.rounds + 1), desc=method.name, unit="round", disable=not progress, dynamic_ncols=True)
    for rnd in bar:
        t_round = time.perf_counter()
        record = method.round(state, rnd)
        rounds.append(_row(rnd, record, time.perf_counter() - t_round))
        bar.set_postfix({k: _show(record[k]) for k in method.postfix if k in record})
    bar.close()
    final = method.final(state)
    final["seconds"] = time.perf_counter() - t_start
    results = results_dict(method.name, cfg.to_dict(), rounds, final)
    write_outputs(out, results)
    return results
