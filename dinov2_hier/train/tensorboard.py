"""``train.tensorboard``: every value of every ``metrics.jsonl`` record, also as TensorBoard
scalars (docs/training-dynamics.md says how to look at a run).

The trainer appends each record (training steps, validation passes) to ``metrics.jsonl`` in
one place, :meth:`~dinov2_hier.train.loop.Trainer._append_metrics`; with the key on, the
same place hands it to :meth:`MetricsBoard.write`, which writes ``OUTPUT_DIR/tensorboard/``
through ``torch.utils.tensorboard.SummaryWriter`` on the main process only. A tag is the
record's key (``loss_dino``, ``dino_teacher_entropy``, ``lr``, ...), a validation record's
keys go under ``val/`` (``val/val_total``, ``val/teacher_temp``), the step is the record's
``iteration``; a bool is written as 0 / 1, a None (``max_memory_gib`` on the CPU) and text
(``split``) are left out. A resumed run appends to the same folder and purges the events
after the checkpoint it resumes from (those iterations are redone, as in ``metrics.jsonl``).

The ``tensorboard`` package is an optional extra (``pip install tensorboard`` or
``pip install -e .[tensorboard]``): :func:`require_summary_writer` checks for it before
anything is built, so a run that asks for it without it stops with one line (exit 2).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UserError

#: The folder of the event files, under the run's output directory.
TENSORBOARD_DIR = "tensorboard"
#: Tag prefix of the values of validation records.
VAL_TAG_PREFIX = "val/"


class TensorBoardMissing(UserError, ImportError):
    """``train.tensorboard=true`` but the ``tensorboard`` package is not installed (exit 2)."""


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; :class:`TensorBoardMissing` without the
    ``tensorboard`` package. (Tests replace this function to record what is written.)"""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise TensorBoardMissing(
            "train.tensorboard=true needs the tensorboard package, which is not installed "
            f"({exc}): pip install tensorboard (or pip install -e .[tensorboard]), or set train.tensorboard=false"
        ) from None
    return SummaryWriter


def require_summary_writer() -> None:
    """Raise :class:`TensorBoardMissing` now (before the data and model are built) when the
    package is missing."""
    summary_writer_class()


def record_scalars(record: dict[str, Any], val: bool) -> list[tuple[str, float, int]]:
    """``(tag, value, step)`` of every numeric value of a ``metrics.jsonl`` record, in the
    record's order (``iteration`` is the step, not a value)."""
    step = int(record["iteration"])
    prefix = VAL_TAG_PREFIX if val else ""
    out = []
    for key, value in record.items():
        if key == "iteration" or value is None or isinstance(value, str):
            continue
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)):
            out.append((prefix + key, float(value), step))
    return out


class MetricsBoard:
    """A ``SummaryWriter`` on ``OUTPUT_DIR/tensorboard/`` fed with metrics records.

    ``resumed_at``: the iteration a resumed run continues from (0: a new run); events of
    later steps, written before the run was stopped, are purged.
    """

    def __init__(self, output_dir: str | Path, resumed_at: int = 0):
        writer_class = summary_writer_class()
        self.log_dir = Path(output_dir) / TENSORBOARD_DIR
        kwargs = {"purge_step": resumed_at + 1} if resumed_at > 0 else {}
        self.writer = writer_class(log_dir=str(self.log_dir), **kwargs)

    def write(self, record: dict[str, Any], val: bool) -> None:
        # NaN / inf are written as they are (TensorBoard shows them); flushed per record, so
        # that TensorBoard follows a running job (records come every train.log_every steps).
        for tag, value, step in record_scalars(record, val):
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
