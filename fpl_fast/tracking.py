"""An optional TensorBoard log of a run's rounds (``--tensorboard DIR``), written through torch's SummaryWriter
(needs the ``tensorboard`` package: ``pip install '.[tensorboard]'``).

results.json and rounds.csv stay the record: the event file holds the same per-round values, rounds.csv's columns
with the round as the step, for watching a run live and comparing runs (``tensorboard --logdir DIR``).

The tags say what each value is and what protects it:

- ``private/loss``, ``private/clipped_fraction``: statistics of the clients' private training data (the mean
  training loss; the fraction of clipped gradients). No DP guarantee covers them. They stay on the machine that
  trains (Flower never sends them, so a Flower server's log has none): keep an event file that holds them as you
  keep the data.
- ``released/...``: what the run reports anyway: the accuracies of the trained prompts (DP releases) on the
  clients' test splits, and the accountant's epsilons. DP covers the training examples, not the test splits.
- ``time/seconds_elapsed``: wall seconds since the run started.

A one-line text (tag ``about``) in the event file says the same, and ``config`` holds the run's configuration.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ABOUT", "TAGS", "RoundLog", "open_round_log", "require_tensorboard"]

# rounds.csv's column -> its tag (a column of no tag is not logged: ``round`` is the step, ``dropped`` client ids).
TAGS: dict[str, str] = {
    "local_acc": "released/local_acc",
    "neighbor_acc": "released/neighbor_acc",
    "epsilon_local": "released/epsilon_local",
    "epsilon_global": "released/epsilon_global",
    "epsilon_total": "released/epsilon_total",
    "loss": "private/loss",
    "clipped_fraction": "private/clipped_fraction",
    "clip_norm": "released/clip_norm",
    "seconds_elapsed": "time/seconds_elapsed",
}

ABOUT = (
    "private/* (training loss, clipped fraction): statistics of the clients' private training data that no DP "
    "guarantee covers; they never leave the machine that trains. released/*: accuracies of the DP-trained prompts "
    "on the clients' test splits and the accountant's epsilons. time/*: wall seconds since the run started. "
    "results.json and rounds.csv are the record."
)


def require_tensorboard(logdir: str | Path | None) -> None:
    """Check, before anything is loaded or trained, that a log in ``logdir`` can be written (None: no log).

    Raises:
        ValueError: one line: the tensorboard package is missing, or ``logdir`` is a file.
    """
    if logdir is None:
        return
    try:
        import torch.utils.tensorboard  # noqa: F401  (raises ImportError without the tensorboard package)
    except ImportError:
        raise ValueError(
            f"--tensorboard {logdir}: the tensorboard package is not installed: pip install tensorboard "
            "(or pip install '.[tensorboard]')"
        ) from None
    if Path(logdir).exists() and not Path(logdir).is_dir():
        raise ValueError(f"--tensorboard {logdir} is a file, not a folder")


class RoundLog:
    """The event file of one run: :meth:`write` logs one round's record, :meth:`close` ends it."""

    def __init__(self, writer: Any) -> None:
        self._writer = writer

    def write(self, row: Mapping[str, Any], *, extra: Iterable[str] = ()) -> None:
        """Log ``row`` (a record with ``round``) at step ``round``: each column of :data:`TAGS` that holds a number
        (a missing or None value, such as FedDTPT's epsilon, is left out, as rounds.csv leaves its cell empty), and
        each key of ``extra`` (rounds.csv's further columns: a protocol's accuracies) as ``released/<key>``."""
        step = int(row["round"])
        for key, tag in [*TAGS.items(), *((k, f"released/{k}") for k in extra)]:
            value = row.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(tag, float(value), global_step=step)
        self._writer.flush()  # a round is minutes of work: show it now, and lose none of it to a crash

    def close(self) -> None:
        self._writer.close()


def open_round_log(logdir: str | Path, *, method: str, config: Mapping[str, Any], first_round: int = 1) -> RoundLog:
    """A :class:`RoundLog` in ``logdir`` (created).

    Args:
        method: the method's name, in the ``about`` text.
        config: the run's configuration, logged as JSON text (tag ``config``).
        first_round: the first round this process runs. Above 1 (a resumed run) the log continues the earlier
            process's event files: steps from ``first_round`` on that they hold (rounds logged after the last
            checkpoint, run again now) are purged, and the texts are not written again.

    Raises:
        ValueError: a new run (``first_round`` 1) into a folder that already holds logged rounds (of another
            run: their curves would mix), or see :func:`require_tensorboard`.
    """
    require_tensorboard(logdir)
    from torch.utils.tensorboard import SummaryWriter

    if first_round <= 1 and _logs_rounds(Path(logdir)):
        raise ValueError(
            f"--tensorboard {logdir} holds the log of an earlier run: choose another folder (nothing was written to it)"
        )

    writer = SummaryWriter(log_dir=str(logdir), purge_step=first_round if first_round > 1 else None)
    if first_round <= 1:
        writer.add_text("about", f"fpl_fast {method}: {ABOUT}", global_step=0)
        writer.add_text("config", f"```\n{json.dumps(dict(config), indent=1, default=str)}\n```", global_step=0)
    return RoundLog(writer)


def _logs_rounds(logdir: Path) -> bool:
    """Whether event files in ``logdir`` hold a scalar (a run that only wrote its texts before it stopped does not
    count: its next attempt starts afresh there)."""
    if not any(logdir.glob("events.out.tfevents.*")):
        return False
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return bool(acc.Tags()["scalars"])
