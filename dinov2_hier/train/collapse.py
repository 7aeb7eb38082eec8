"""Detect a self-distillation run that has stopped learning (docs/training-dynamics.md).

DINO and iBOT are cross-entropies between teacher targets and student predictions over
``K`` prototypes. ``ln K - H(p) = KL(p || uniform)`` measures how far a distribution is
from uniform, in nats. A run has *collapsed* when, for one of the two losses, the
student's predictions or the teacher's targets are within :data:`UNIFORM_KL_NATS` of the
uniform distribution for :data:`CONSECUTIVE_RECORDS` logged steps in a row, from
``train.collapse_check_after`` iterations on. The loss then sits at ``ln K`` whatever the
image: the student predicts nothing and the teacher asks for nothing, and whatever the
features learn comes from the other terms (KoLeo, supervised heads), not from DINO / iBOT.

A healthy run stays well away from it: at initialisation the student's KL to uniform is
about ``Var(logits / T_student) / 2`` (0.17 nats for the ViT-S head, 0.39 for the demo) and it grows as
targets sharpen; the collapsed runs measured (docs/training-dynamics.md) sat at 0.0003-0.008.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RunAborted
from ..io import read_jsonl
from ..models.artifacts import RUN_CONFIG_FILE, run_dir_of_file
from .checkpoint import METRICS_FILE

logger = logging.getLogger("dinov2_hier.train")

#: KL to the uniform distribution (nats) under which a distribution counts as uniform.
UNIFORM_KL_NATS = 0.01
#: Logged steps in a row that must look collapsed before the detector fires.
CONSECUTIVE_RECORDS = 3
DOCS = "docs/training-dynamics.md"


class CollapseError(RunAborted, RuntimeError):
    """``train.stop_on_collapse``: the run collapsed (exit code 3)."""


@dataclass
class LossCollapse:
    """One distillation loss's distance from uniform at a logged step (nats)."""

    loss: str
    ln_k: float
    student_kl: float
    teacher_kl: float

    @property
    def collapsed(self) -> bool:
        return min(self.student_kl, self.teacher_kl) < UNIFORM_KL_NATS

    def describe(self) -> str:
        which = []
        if self.student_kl < UNIFORM_KL_NATS:
            which.append("the student predicts a near-uniform distribution")
        if self.teacher_kl < UNIFORM_KL_NATS:
            which.append("the teacher targets are near-uniform (they carry no information)")
        return (
            f"{self.loss}: {' and '.join(which) or 'healthy'} (KL to uniform: student "
            f"{self.student_kl:.4f}, teacher {self.teacher_kl:.4f} nats; ln K = {self.ln_k:.4f})"
        )


def loss_collapse(record: dict, loss: str, ln_k: float) -> LossCollapse | None:
    """The distances from uniform of ``loss`` (``dino`` or ``ibot``) in a metrics record,
    or None when the record does not have that loss's entropies."""
    student, teacher = record.get(f"{loss}_student_entropy"), record.get(f"{loss}_teacher_entropy")
    if student is None or teacher is None:
        return None
    # ln K - H is a KL divergence (>= 0); float32 entropies of near-uniform rows overshoot by ~1e-6.
    return LossCollapse(loss, ln_k, max(0.0, ln_k - float(student)), max(0.0, ln_k - float(teacher)))


@dataclass
class CollapseDetector:
    """Watches the metrics records of a run (:meth:`observe`, one call per logged step).

    Args:
        ln_k: ``{"dino": ln K_dino, "ibot": ln K_ibot}`` for the losses the run computes.
        check_after: first iteration at which a collapse is reported (earlier records
            are observed but never fire: the first steps pass through near-uniform
            predictions while the heads are random).
        stop: raise :class:`CollapseError` when it fires (``train.stop_on_collapse``).
        log: log the warnings (the main process; the other ranks decide the same silently).
    """

    ln_k: dict[str, float]
    check_after: int
    stop: bool = False
    log: bool = True
    streak: int = 0
    detected_at: int | None = None
    last: list[LossCollapse] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ln_k and self.log:
            logger.info("collapse checks skipped: the run computes no DINO / iBOT loss (ln K checks apply only to them)")

    @property
    def checked(self) -> bool:
        """Whether there is anything to check (a DINO or iBOT loss)."""
        return bool(self.ln_k)

    def observe(self, record: dict, quiet: bool = False) -> None:
        """Update from one metrics record (``iteration`` and the entropies). Logs one
        warning when the collapse is first detected (and a note if it ends); ``quiet``
        replays records without logging or stopping (resume)."""
        found = [c for c in (loss_collapse(record, name, lk) for name, lk in self.ln_k.items()) if c is not None]
        if not found:
            return
        was_collapsed = self.collapsed_now
        self.last = found
        iteration = int(record["iteration"])
        bad = [c for c in found if c.collapsed]
        self.streak = self.streak + 1 if bad else 0
        if bad and self.detected_at is None and self.streak >= CONSECUTIVE_RECORDS and iteration >= self.check_after:
            self.detected_at = iteration
            if quiet:
                return
            message = (
                f"COLLAPSE at iteration {iteration}: " + "; ".join(c.describe() for c in bad)
                + f". The DINO/iBOT losses are at ln K and teach the backbone nothing; see {DOCS}"
                " for the causes and the small-data recipe (configs/train/vits14_small.yaml)."
            )
            if self.log:
                logger.warning(message)
            if self.stop:
                raise CollapseError(message + " Stopped (train.stop_on_collapse=true).")
        elif not bad and was_collapsed and self.detected_at is not None and not quiet and self.log:
            logger.warning("iteration %d: no longer collapsed: %s", iteration, "; ".join(c.describe() for c in found))

    @property
    def collapsed_now(self) -> bool:
        """The last observed record looks collapsed."""
        return any(c.collapsed for c in self.last)

    def verdict(self, record: dict | None) -> str:
        """One line for the end of a run: each loss against ``ln K`` and the collapse status."""
        parts = []
        for loss, ln_k in self.ln_k.items():
            value = (record or {}).get(f"loss_{loss}")
            if value is not None:
                # iBOT's loss averages over all crops (unmasked ones add 0): only DINO's compares to ln K.
                vs = f"loss - ln K = {value - ln_k:+.3f}" if loss == "dino" else f"ln K = {ln_k:.3f}"
                parts.append(f"{loss} loss {value:.4f} ({vs})")
        for c in self.last:
            parts.append(f"{c.loss} KL to uniform: teacher {c.teacher_kl:.3f}, student {c.student_kl:.3f} nats")
        if not self.checked:
            status = "collapse checks skipped (no DINO / iBOT loss)"
        elif self.detected_at is None:
            status = "no collapse detected"
        elif self.collapsed_now:
            status = f"COLLAPSED since iteration {self.detected_at} (see {DOCS})"
        else:
            status = f"collapsed at iteration {self.detected_at}, not any more"
        return "; ".join(parts + [status])

    def summary(self) -> dict:
        """What the run summary records: where the collapse was first detected (or None),
        whether the last logged step still looks collapsed, and its distances from uniform."""
        return {
            "checked": self.checked,
            "collapsed": self.detected_at is not None and self.collapsed_now,
            "detected_at_iteration": self.detected_at,
            "uniform_kl_threshold_nats": UNIFORM_KL_NATS,
            "last": {
                c.loss: {"ln_k": c.ln_k, "student_kl_to_uniform": c.student_kl, "teacher_kl_to_uniform": c.teacher_kl}
                for c in self.last
            },
        }


def ln_k_of(cfg) -> dict[str, float]:  # noqa: ANN001 (DictConfig)
    """``ln K`` of each distillation loss the config computes (none with both weights 0)."""
    from omegaconf import OmegaConf

    out = {}
    if OmegaConf.select(cfg, "dino.loss_weight", default=1.0) > 0:  # 1.0: the default's value
        out["dino"] = math.log(cfg.dino.head_n_prototypes)
    if cfg.ibot.loss_weight > 0:
        k_ibot = cfg.ibot.head_n_prototypes if cfg.ibot.separate_head else cfg.dino.head_n_prototypes
        out["ibot"] = math.log(k_ibot)
    return out


def run_collapse_status(run_dir: str | Path, up_to_iteration: int | None = None) -> dict | None:
    """The collapse verdict of a training run directory, replayed from its ``config.yaml``
    and ``metrics.jsonl`` over the records up to ``up_to_iteration`` (default: all), as
    :meth:`CollapseDetector.summary` plus ``"iteration"`` (the last record used). None
    when the directory holds no training run (no config.yaml or metrics.jsonl).
    Validation records (``"split": "val"``) carry no diagnostics and are passed over."""
    from omegaconf import OmegaConf

    from .validation import is_val_record

    run = Path(run_dir)
    config, metrics = run / RUN_CONFIG_FILE, run / METRICS_FILE
    if not (config.is_file() and metrics.is_file()):
        return None
    cfg = OmegaConf.load(config)
    check_after = OmegaConf.select(cfg, "train.collapse_check_after", default=300)
    detector = CollapseDetector(ln_k_of(cfg), int(check_after), log=False)
    last = None
    for record in read_jsonl(metrics)[0]:  # a torn last line (disk full while appending) is left out
        if is_val_record(record):
            continue
        if up_to_iteration is not None and record.get("iteration", 0) > up_to_iteration:
            break
        detector.observe(record, quiet=True)
        last = record.get("iteration")
    return {**detector.summary(), "iteration": last}


def run_dir_of(checkpoint: str | Path) -> Path | None:
    """The training run directory a checkpoint file belongs to (``RUN/checkpoints/ckpt_*.pt``
    or ``RUN/teacher_backbone.pt``), or None."""
    run = run_dir_of_file(checkpoint)
    return run if (run / RUN_CONFIG_FILE).is_file() and (run / METRICS_FILE).is_file() else None
