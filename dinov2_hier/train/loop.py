"""The training loop: iterations, logging, metrics, checkpoints and resume.

Length (~720 lines): :class:`Trainer` is one object whose state a checkpoint saves and
restores whole (model, optimizer, loader position, RNG, counters); the step itself is
:mod:`.step`'s and the teacher file's metadata :class:`~dinov2_hier.models.BackboneSpec`'s.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from omegaconf import DictConfig

from .. import distributed
from ..config import save_config, to_yaml
from ..data import SkipCounter
from ..errors import RunAborted
from ..io import atomic_torch_save, atomic_write_text, read_jsonl
from ..losses.guided import set_supervised_epoch
from ..models.artifacts import RUN_CONFIG_FILE, teacher_backbone_state
from ..models.spec import BackboneSpec
from .batch import batch_to_device
from .collapse import CollapseDetector, CollapseError, ln_k_of
from .checkpoint import (
    CHECKPOINT_DIR,
    GOOD_KEY,
    METRICS_FILE,
    TEACHER_FILE,
    CheckpointError,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    why_not_good,
)
from .data import build_train_data, build_train_loader
from .meta_arch import SSLMetaArch
from .parallel import (
    gather_model_state,
    gather_optimizer_state,
    load_model_state_any,
    load_optimizer_state_any,
)
from .supervision import build_supervision
from .tensorboard import TENSORBOARD_DIR, MetricsBoard, require_summary_writer
from .run_lock import RunLock
from .parts import build_step_parts, resolve_step_compute
from .step import PendingStep, StepOutput, train_step
from .validation import (
    DEFAULT_CRITERION,
    SPLIT_KEY,
    VAL_SPLIT,
    ValidationPass,
    best_of,
    hold_out,
    is_val_record,
    val_losses,
)

logger = logging.getLogger("dinov2_hier.train")

#: Written at the end of every run (also when stopped): progress, last record, collapse verdict.
SUMMARY_FILE = "run_summary.json"


class NonFiniteLossError(RunAborted, RuntimeError):
    """Too many consecutive steps had a NaN/inf loss."""


@dataclass
class RunState:
    """Mutable loop state that a checkpoint restores."""

    iteration: int = 0
    nonfinite_streak: int = 0
    nonfinite_total: int = 0
    interrupted: bool = False


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def teacher_backbone_payload(
    model: SSLMetaArch, cfg: DictConfig, iteration: int, model_state: dict | None = None
) -> dict:
    """The teacher backbone as a plain state dict plus what evaluation needs to rebuild it:
    ``{"model": state_dict, "meta": BackboneSpec.from_config(cfg).to_metadata() + "iteration"}``.

    ``model_state``: a full ``SSLMetaArch`` state dict to take the teacher from (what a
    sharded model gathers on rank 0, see :func:`~dinov2_hier.train.parallel.gather_model_state`);
    default: ``model.teacher["backbone"].state_dict()`` (an unsharded model).
    """
    if model_state is None:
        backbone_state = model.teacher["backbone"].state_dict()
    else:
        backbone_state = teacher_backbone_state(model_state)
    return {
        "model": {k: v.detach().cpu() for k, v in backbone_state.items()},
        "meta": {**BackboneSpec.from_config(cfg).to_metadata(), "iteration": int(iteration)},
    }


def _truncate_metrics(path: Path, last_iteration: int) -> list[dict]:
    """Drop records written after the checkpoint we resume from (they will be redone);
    return the records kept. A line that is not JSON (torn by a full disk or a kill while
    appending) is dropped with a warning naming it. Only the main process rewrites the file."""
    if not path.exists():
        return []
    records, torn = read_jsonl(path)
    for number in torn:
        logger.warning("%s line %d is not a JSON record (torn while writing?); dropped on resume", path, number)
    kept = [record for record in records if record.get("iteration", -1) <= last_iteration]
    if distributed.is_main_process():
        atomic_write_text(path, "".join(f"{json.dumps(record)}\n" for record in kept))
    return kept


@dataclass
class _Launched:
    """A queued step: its iteration, schedule values, report (None: skipped on the host
    because a rank had no readable image) and images over all ranks."""

    iteration: int
    schedule: dict
    out: PendingStep | None
    n_images: int
    #: When the step was finished, if known when it returned (a CPU step, or a skipped one);
    #: None: when its report is read (a CUDA step: the read waits for it).
    finished_at: float | None = None


@dataclass
class _RateWindow:
    """Images and time since the last log line, for images/s and the ETA.

    Times are those at which steps finished (:attr:`_Launched.finished_at`), not those at
    which their reports are read: a report is read one step late, so on the CPU a reading
    time is the end of the *next* step, and the last step, read right after the one
    before it, would otherwise divide its images by almost no time (13,139 img/s seen).
    """

    start_iteration: int
    end: int
    images: int = 0
    start: float = field(default_factory=lambda: time.perf_counter())
    run_start: float = field(default_factory=lambda: time.perf_counter())


class Trainer:
    """Builds everything from a resolved config and runs the iterations.

    Args:
        cfg: merged config (``compute`` gets resolved in place).
        output_dir: where config.yaml, metrics.jsonl, checkpoints and the teacher go.
        resume: continue from the newest checkpoint in ``output_dir`` if there is one.
    """

    def __init__(self, cfg: DictConfig, output_dir: str | Path, resume: bool = True):
        self.cfg = cfg
        if cfg.train.tensorboard:
            require_summary_writer()  # a missing package stops the run before anything is built
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        #: train.tensorboard: the writer, on the main process while run() runs (tensorboard.py).
        self._board: MetricsBoard | None = None
        self.rank = distributed.get_rank()
        # One run per directory: the main process holds OUTPUT_DIR/.lock until run() ends.
        self._lock = RunLock(self.output_dir) if distributed.is_main_process() else None
        self.world_size = distributed.get_world_size()
        # Device, precision and parallel mode first: the data and validation need them.
        compute = resolve_step_compute(cfg, self.world_size)
        self.device, self.precision, self.parallel = compute.device, compute.precision, compute.parallel
        # Per-iteration counts and stop flags agree over the ranks on the CPU, so that the
        # host never waits for the GPU between steps (None on one process).
        self.host_group = distributed.new_host_group()

        logger.info("building the data (%s) and the model (%s, %s)...", ", ".join(str(s) for s in cfg.data.train),
                    cfg.student.arch, self.device)
        # data.val_fraction / data.val: the held-out images leave the training set (validation.py).
        self.data, val_dataset = hold_out(cfg, build_train_data(cfg))
        self.supervision = build_supervision(cfg, self.data.dataset, val_dataset)
        hierarchy = self.supervision.hierarchy if self.supervision is not None else None
        # The step's parts, built as bench/train_step.py builds them (parts.py).
        parts = build_step_parts(cfg, compute, hierarchy, self.world_size, self.rank)
        self.model, self.engine, self.optimizer = parts.model, parts.engine, parts.optimizer
        self.scaler, self.schedules = parts.scaler, parts.schedules
        self.grad_groups, self.clip_per_group = parts.grad_groups, parts.clip_per_group
        # Iterations at the start with the backbone frozen (fresh heads on a pretrained backbone).
        self.head_warmup_iterations = parts.head_warmup_iterations
        self.skips = SkipCounter()
        self.validation = None
        if val_dataset is not None and cfg.train.val_every > 0:
            self.validation = ValidationPass(
                val_dataset, self.data.collator, cfg, self.rank, self.world_size, self.device, self.precision,
                self._to_device, int(cfg.train.val_max_batches), self.host_group,
            )
        # Validation loss (train.val_every) of each checkpoint iteration: the lowest one's
        # checkpoint is never pruned, and the run summary names it.
        self._val_at_checkpoints: dict[int, float] = {}
        self.state = RunState()
        self._pending: list[_Launched] = []  # queued steps whose report is not read yet
        self.collapse = CollapseDetector(
            ln_k_of(cfg), int(cfg.train.collapse_check_after), stop=bool(cfg.train.stop_on_collapse),
            log=distributed.is_main_process(),  # every rank decides the same; one rank tells it
        )
        self._last_record: dict | None = None
        # The newest checkpoint to resume from (checkpoint.why_not_good): named when
        # non-finite losses stop the run, and never pruned.
        self._newest_good: Path | None = None
        if resume:
            self._maybe_resume()
        else:
            self._set_aside_previous_run()

    # -- set-up helpers -------------------------------------------------------------------
    def _set_aside_previous_run(self) -> None:
        """``--no-resume``: move the previous run's checkpoints, records, summary, teacher
        file, TensorBoard events and config into ``OUTPUT_DIR/replaced_<time>/``, so that no later resume can
        pick them and the new run's records do not mix with them. Rank 0 moves; all wait."""
        names = (CHECKPOINT_DIR, METRICS_FILE, SUMMARY_FILE, TEACHER_FILE, RUN_CONFIG_FILE, TENSORBOARD_DIR)
        present = [name for name in names if (self.output_dir / name).exists()]
        if present and distributed.is_main_process():
            stamp = time.strftime("%Y%m%d-%H%M%S")
            target = self.output_dir / f"replaced_{stamp}"
            suffix = 1
            while target.exists():
                target, suffix = self.output_dir / f"replaced_{stamp}_{suffix}", suffix + 1
            target.mkdir()
            for name in present:
                os.replace(self.output_dir / name, target / name)
            logger.warning("--no-resume: starting over; the previous run's %s moved to %s", ", ".join(present), target)
        distributed.barrier()  # every rank, whatever it saw: rank 0 may have moved the files already

    def _maybe_resume(self) -> None:
        if self._lock is not None:
            self._remove_partial_writes()
        distributed.barrier()
        found = self._newest_good_checkpoint()
        if found is None:
            # Nothing to resume: records of an attempt killed before its first checkpoint go.
            if distributed.is_main_process():
                _truncate_metrics(self.output_dir / METRICS_FILE, 0)
            return
        path, ckpt = found
        self._newest_good = path
        if ckpt.get("hierarchy_fingerprint", "") != self._hierarchy_fingerprint():
            raise CheckpointError(
                f"{path}: written with another label hierarchy than supervision.hierarchy now names; "
                "use a new output directory or --no-resume"
            )
        load_model_state_any(self.engine, ckpt["model"], path)
        load_optimizer_state_any(self.engine, self.optimizer, ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.skips.load_state_dict(ckpt["skips"])
        self._restore_rng(ckpt)
        self.state = RunState(
            iteration=int(ckpt["iteration"]),
            nonfinite_streak=int(ckpt["nonfinite_streak"]),
            nonfinite_total=int(ckpt["nonfinite_total"]),
        )
        records = _truncate_metrics(self.output_dir / METRICS_FILE, self.state.iteration)
        train_records = [record for record in records if not is_val_record(record)]
        for record in train_records:  # the detector's state is a function of the records so far
            self.collapse.observe(record, quiet=True)
        self._last_record = train_records[-1] if train_records else None
        kept = {it for it, _ in list_checkpoints(self.output_dir)}
        self._val_at_checkpoints = {it: v for it, v in val_losses(records).items() if it in kept}
        logger.info(
            "resumed from %s at iteration %d (written by %d rank(s), now %d)",
            path, self.state.iteration, len(ckpt.get("rng_per_rank", [None])), self.world_size,
        )

    def _newest_good_checkpoint(self) -> tuple[Path, dict] | None:
        """The newest checkpoint that loads and is good (:func:`~.checkpoint.why_not_good`),
        and its content. An unreadable one (truncated by a kill or a full disk) or one that is
        not good (written during a non-finite streak, non-finite weights) is skipped with a
        warning and the previous one is tried. None when there is no checkpoint;
        CheckpointError when none of them is readable and good."""
        found = list_checkpoints(self.output_dir)
        for _, path in reversed(found):
            try:
                ckpt = load_checkpoint(path)  # every rank reads the full checkpoint
            except CheckpointError as exc:
                logger.warning("%s; trying the checkpoint before it", exc)
                continue
            flaw = why_not_good(ckpt)
            if flaw is None:
                return path, ckpt
            logger.warning("%s is not a good checkpoint (%s); trying the checkpoint before it", path, flaw)
        if found:
            raise CheckpointError(
                f"none of the {len(found)} checkpoint(s) in {self.output_dir / CHECKPOINT_DIR} can be read "
                "and is good (see the warnings above); move them aside to start over (or use --no-resume)"
            )
        return None

    def _remove_partial_writes(self) -> None:
        """Delete the temporary files of writes a kill interrupted (``.NAME.*.tmp`` of
        :func:`~dinov2_hier.io.atomic_write_file`). Only under the directory's lock: no other
        process can be writing them."""
        leftovers = [p for folder in (self.output_dir, self.output_dir / CHECKPOINT_DIR) if folder.is_dir()
                     for p in folder.glob(".*.tmp") if p.is_file()]
        for path in leftovers:
            path.unlink(missing_ok=True)
        if leftovers:
            logger.warning("removed %d partial file(s) of interrupted writes: %s", len(leftovers),
                           ", ".join(p.name for p in leftovers[:3]))

    def _restore_rng(self, ckpt: dict) -> None:
        """Each rank's own RNG state when the world size is unchanged; on one process rank
        0's; otherwise a fresh per-rank seed (stochastic depth only draws from it)."""
        per_rank = ckpt.get("rng_per_rank")
        if self.world_size == 1:
            _set_rng_state(ckpt["rng"], self.device)
        elif per_rank is not None and len(per_rank) == self.world_size:
            _set_rng_state(per_rank[self.rank], self.device)
        else:
            torch.manual_seed(self.cfg.seed + 1000003 * (int(ckpt["iteration"]) + 1) + self.rank)

    def _hierarchy_fingerprint(self) -> str:
        return self.supervision.hierarchy.fingerprint() if self.supervision is not None else ""

    # -- persistence ----------------------------------------------------------------------
    def save(self) -> Path | None:
        """Write the full checkpoint and, if it is good, the teacher backbone file.

        Called on every rank: a sharded model's full state is gathered onto rank 0
        (collective), which alone writes; the ranks wait for the write (barrier).
        A checkpoint written during a non-finite streak or with non-finite weights is
        recorded as not good (:func:`~.checkpoint.why_not_good`): resume skips it, and
        pruning and the teacher file keep the newest good one.
        Returns the checkpoint path on rank 0, None elsewhere.
        """
        it = self.state.iteration
        model_state = gather_model_state(self.engine)
        optimizer_state = gather_optimizer_state(self.engine, self.optimizer)
        rng_per_rank = distributed.all_gather_objects(_rng_state(self.device)) if self.world_size > 1 else None
        # Judged on rank 0, which alone holds the full weights; every rank learns the verdict
        # so that each names the same last good checkpoint if training stops.
        flaw = (why_not_good({"nonfinite_streak": self.state.nonfinite_streak, "model": model_state})
                if distributed.is_main_process() else None)
        good = not distributed.any_rank(flaw is not None, "cpu", self.host_group)
        newest_good = checkpoint_path(self.output_dir, it) if good else self._newest_good
        if not distributed.is_main_process():
            distributed.barrier()
            self._newest_good = newest_good
            return None
        state = {
            "iteration": it,
            "model": model_state,
            "optimizer": optimizer_state,
            "scaler": self.scaler.state_dict(),
            "skips": self.skips.state_dict(),
            "rng": _rng_state(self.device),
            "nonfinite_streak": self.state.nonfinite_streak,
            "nonfinite_total": self.state.nonfinite_total,
            "config": to_yaml(self.cfg),
            "hierarchy_fingerprint": self._hierarchy_fingerprint(),
            # Images this rank consumed; the sampler resumes from here.
            "consumed_per_rank": it * self.cfg.train.batch_size_per_gpu,
            "world_size": self.world_size,
            GOOD_KEY: good,
        }
        if rng_per_rank is not None:
            state["rng_per_rank"] = rng_per_rank
        best = self._best_val()
        path = save_checkpoint(state, self.output_dir, it, self.cfg.train.keep_checkpoints, newest_good,
                               best[1] if best is not None else None)
        self._newest_good = newest_good
        if good:
            atomic_torch_save(
                teacher_backbone_payload(self.model, self.cfg, it, model_state), self.output_dir / TEACHER_FILE
            )
            logger.info("saved %s", path)
        else:
            logger.warning("saved %s, not a good checkpoint (%s): resume will skip it; the last good one is %s",
                           path, flaw, newest_good or "none yet")
        distributed.barrier()
        return path

    def _best_val(self) -> tuple[int, Path, float] | None:
        """``(iteration, path, validation loss)`` of the checkpoint with the lowest one so far."""
        losses = self._val_at_checkpoints
        return best_of(losses, [(it, checkpoint_path(self.output_dir, it)) for it in sorted(losses)])

    def _validate(self, done: int, checkpoint: bool) -> None:
        """The validation pass after ``done`` iterations (every rank), its record and log line."""
        teacher_temp = self.schedules.values(done - 1)["teacher_temp"]  # the last step's
        values = self.validation.run(self.engine, teacher_temp)
        if values is None:
            logger.warning("iteration %d: no held-out image was readable; no validation record", done)
            return
        record = {"iteration": done, SPLIT_KEY: VAL_SPLIT, **values, "teacher_temp": teacher_temp}
        self._append_metrics(record)
        total = values.get(DEFAULT_CRITERION)
        if checkpoint and total is not None and math.isfinite(total):
            self._val_at_checkpoints[done] = total
        losses = " ".join(f"{k[len('val_'):]}={v:.4f}" for k, v in values.items()
                          if k not in ("val_images", "val_skipped", "val_s"))
        logger.info("val it %d/%d %s (%d held-out images, %.1f s)", done, self.cfg.train.iterations, losses,
                    values["val_images"], values["val_s"])

    def _append_metrics(self, record: dict) -> None:
        """The one place every logged value passes: ``metrics.jsonl`` and, with
        ``train.tensorboard``, TensorBoard (main process only)."""
        if distributed.is_main_process():
            with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self._board is not None:
                self._board.write(record, val=is_val_record(record))

    # -- the loop -------------------------------------------------------------------------
    def _frozen(self, it: int) -> list:
        """Parameters the step at ``it`` must not update: the backbone during the head
        warm-up, the supervised heads before ``supervision.start_iteration`` (their loss
        weighs 0 then, but AdamW's weight decay would still shrink them)."""
        frozen: list = []
        if it < self.head_warmup_iterations:
            frozen += self.grad_groups["backbone"]
        if self.schedules.supervision_weight(it) == 0.0:
            frozen += self.grad_groups.get("supervised", [])
        return frozen

    def _to_device(self, batch: dict) -> dict:
        """The batch on the device, with supervision targets and (``crops.photometric=device``)
        the photometric augmentations applied there."""
        if self.supervision is not None:
            batch = {**batch, "targets": self.supervision.batch_targets(batch["labels"], batch["datasets"])}
            if self.supervision.domains is not None:  # a term uses domains (boda)
                batch["domains"] = self.supervision.batch_domains(batch["datasets"])
        return batch_to_device(batch, self.device, self.data.augmentation)

    def run(self, stop_at: int | None = None, should_stop: Callable[[], bool] | None = None) -> RunState:
        """Train until ``train.iterations`` (or ``stop_at``, then checkpoint and return).

        ``should_stop`` is polled after every iteration (e.g. a flag set by a SLURM
        preemption signal handler); when it returns True the loop writes a checkpoint and
        returns with ``state.interrupted`` set, so the next start resumes from there.
        """
        cfg = self.cfg
        total = cfg.train.iterations
        end = total if stop_at is None else min(stop_at, total)
        if distributed.is_main_process():
            save_config(cfg, self.output_dir / RUN_CONFIG_FILE)
            if cfg.train.tensorboard and self._board is None:  # closed by release(), whatever ends the run
                self._board = MetricsBoard(self.output_dir, resumed_at=self.state.iteration)
                logger.info("TensorBoard: tensorboard --logdir %s", self._board.log_dir)
        logger.info("data: %s", self.data.description)
        logger.info(
            "model: %s, %.1fM student parameters; device %s, %s; batch %d x %d ranks (parallel: %s)",
            cfg.student.arch,
            sum(p.numel() for p in self.model.student.parameters()) / 1e6,
            self.device, self.precision.dtype, cfg.train.batch_size_per_gpu, self.world_size, self.parallel,
        )
        consumed = self.state.iteration * cfg.train.batch_size_per_gpu
        loader = build_train_loader(
            self.data, cfg, consumed, self.rank, self.world_size, self.device, self.supervision
        )
        compiled = str(cfg.compute.compile)
        logger.info(
            "starting %d loader worker(s) and the first step%s; a line every %d iterations follows",
            loader.num_workers,
            f" (compiling under compute.compile={compiled}: the first steps take longer)" if compiled != "none" else "",
            cfg.train.log_every,
        )
        batches = iter(loader)
        self.engine.train()
        self._window = _RateWindow(start_iteration=self.state.iteration, end=end)
        # Each step's report is read after the next step is queued (at most one stays
        # pending), so the GPU is never idle while the host reads, logs and loads data.
        self._pending = []
        self._supervised_epoch: int | None = None  # the epoch the growing-embedding terms were told

        try:
            self._iterate(batches, end, should_stop)
        except CollapseError:  # train.stop_on_collapse: keep the state for inspection
            self._pending = []
            self.save()
            self.write_summary()
            raise
        finally:
            self.release()
        self.write_summary()
        return self.state

    def release(self) -> None:
        """Close the TensorBoard writer and give up the output directory's lock (run() does
        at its end, also on an error or a stop signal; idempotent)."""
        if self._board is not None:
            self._board.close()
            self._board = None
        if self._lock is not None:
            self._lock.release()

    def _iterate(self, batches: Iterator[dict], end: int, should_stop: Callable[[], bool] | None) -> None:
        cfg = self.cfg
        while self.state.iteration < end:
            it = self.state.iteration
            batch = next(batches)
            n_images = batch["global_crops"].shape[0] // 2
            # Counts over all ranks, so that every rank takes the same decisions: stop for
            # too many unreadable images, or skip the step when some rank has no image left
            # (the others would wait for it in the step's collectives).
            counts = self._global_counts(n_images, len(batch["skipped"]), batch["n_drawn"])
            # Logs this rank's bad paths, each once, a missing file as missing.
            self.skips.update(batch["skipped"], batch["n_drawn"], batch.get("skipped_errors"))
            self.skips.n_skipped += counts["skipped"] - len(batch["skipped"])
            self.skips.n_drawn += counts["drawn"] - batch["n_drawn"]
            self.skips.check(cfg.data.max_unreadable_fraction, cfg.data.min_draws_before_check)
            schedule = self.schedules.values(it)
            epoch = it // cfg.train.epoch_length
            if epoch != self._supervised_epoch:  # Gräbel et al.'s growing embedding (guide terms)
                set_supervised_epoch(self.model.supervised, epoch)
                self._supervised_epoch = epoch
            if counts["empty"] > 0:
                logger.warning("iteration %d: every image of a rank's batch was unreadable; step skipped", it)
                out = None
            else:
                out = train_step(
                    self.engine, self.optimizer, self.scaler, self._to_device(batch), schedule,
                    self.precision, cfg.optim.clip_grad, self.grad_groups, self.clip_per_group,
                    with_stats=is_logged(it + 1, cfg.train.log_every, end),
                    frozen=self._frozen(it),
                )
            self.state.iteration = it + 1
            finished_at = time.perf_counter() if out is None or out.on_host else None
            self._pending.append(_Launched(it, schedule, out, counts["images"], finished_at))
            self._finish_pending(keep_last=True)

            done = self.state.iteration
            saved = done % cfg.train.checkpoint_every == 0 or done == end
            validate = self.validation is not None and (done % cfg.train.val_every == 0 or saved)
            if saved or validate:
                self._finish_pending(keep_last=False)
            if validate:  # before the checkpoint: a kill in between leaves no record beyond it
                self._validate(done, checkpoint=saved)
            if saved:
                self.save()
            if done < end and should_stop is not None and distributed.any_rank(bool(should_stop()), "cpu", self.host_group):
                logger.warning("stop requested at iteration %d: checkpointing", done)
                if not saved:
                    self._finish_pending(keep_last=False)
                    self.save()
                self.state.interrupted = True
                break
        self._finish_pending(keep_last=False)

    def write_summary(self) -> None:
        """``run_summary.json``: iterations done, whether the run was interrupted, the last
        metrics record and the collapse verdict (:class:`~dinov2_hier.train.collapse.CollapseDetector`);
        the same verdict as one log line."""
        if not distributed.is_main_process():
            return
        summary = {
            "iteration": self.state.iteration,
            "iterations": int(self.cfg.train.iterations),
            "interrupted": self.state.interrupted,
            "collapse": self.collapse.summary(),
            "last_record": self._last_record,
        }
        best = self._best_val()
        if best is not None:
            summary["best_val"] = {"iteration": best[0], "checkpoint": str(best[1]), DEFAULT_CRITERION: best[2]}
        atomic_write_text(self.output_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
        logger.info("summary at iteration %d: %s", self.state.iteration, self.collapse.verdict(self._last_record))

    def _finish_pending(self, keep_last: bool) -> None:
        """Read the reports of the queued steps (all, or all but the newest): track
        non-finite steps (raises after too many in a row) and log."""
        while len(self._pending) > (1 if keep_last else 0):
            launched = self._pending.pop(0)
            out = launched.out.read() if launched.out is not None else None
            finished = launched.finished_at if launched.finished_at is not None else time.perf_counter()
            if out is not None:
                self._track_nonfinite(launched.iteration, out)
            self._log(launched, out, finished)

    def _log(self, launched: _Launched, out: StepOutput | None, finished: float) -> None:
        """Count the step's images; on a logged step write the record and the log line.
        ``finished``: when the step finished (the end of the rate window)."""
        cfg, total = self.cfg, self.cfg.train.iterations
        done = launched.iteration + 1
        window = self._window
        window.images += launched.n_images
        if done == window.start_iteration + 1 and not is_logged(done, cfg.train.log_every, window.end):
            logger.info("first step done, %.1f s after the loader started", finished - window.run_start)
        if out is None or not is_logged(done, cfg.train.log_every, window.end):
            return
        now = finished
        ips = window.images / (now - window.start) if now > window.start else float("nan")
        per_it = (now - window.run_start) / max(done - window.start_iteration, 1)
        schedule = launched.schedule
        record = {
            "iteration": done,
            **{f"loss_{k}": v for k, v in out.losses.items()},
            **{k: v for k, v in schedule.items()},
            "grad_norm": out.grad_norm,
            **out.stats,
            "applied": out.applied,
            "images_per_s": ips,
            "eta_s": per_it * (total - done),
            "skipped_images": self.skips.n_skipped,
            "max_memory_gib": self._peak_memory_gib(),
        }
        self._append_metrics(record)
        self._last_record = record
        losses = " ".join(f"{k}={v:.4f}" for k, v in out.losses.items())
        logger.info(
            "it %d/%d %s lr=%.2e wd=%.3f mom=%.4f T=%.3f %.1f img/s eta %s | %s",
            done, total, losses, schedule["lr"], schedule["wd"], schedule["momentum"],
            schedule["teacher_temp"], ips, _fmt_seconds(record["eta_s"]), format_stats(out.stats, self.collapse.ln_k),
        )
        window.start, window.images = now, 0
        self.collapse.observe(record)

    def _global_counts(self, n_images: int, n_skipped: int, n_drawn: int) -> dict[str, int]:
        """This batch's readable images, ranks with none, unreadable and drawn items, summed
        over the ranks (one small all-reduce; nothing on one process)."""
        values = [n_images, int(n_images == 0), n_skipped, n_drawn]
        if self.world_size > 1:
            summed = distributed.all_reduce_sum(torch.tensor(values, dtype=torch.long), self.host_group)
            values = [int(v) for v in summed.tolist()]
        return dict(zip(("images", "empty", "skipped", "drawn"), values))

    def _peak_memory_gib(self) -> float | None:
        """Peak allocated GPU memory, the maximum over ranks (None on CPU)."""
        if self.device.type != "cuda":
            return None
        peak = torch.tensor([torch.cuda.max_memory_allocated(self.device) / 2**30], device=self.device)
        return float(distributed.all_reduce_max(peak).item())

    def _track_nonfinite(self, it: int, out: StepOutput) -> None:
        if out.applied:
            self.state.nonfinite_streak = 0
            return
        self.state.nonfinite_streak += 1
        self.state.nonfinite_total += 1
        logger.warning(
            "iteration %d: non-finite loss or gradient (%s); step not applied (%d in a row)",
            it, {k: v for k, v in out.losses.items()}, self.state.nonfinite_streak,
        )
        limit = self.cfg.train.max_consecutive_nonfinite
        if self.state.nonfinite_streak >= limit:
            where = (f"the last good checkpoint is {self._newest_good}" if self._newest_good is not None
                     else "no good checkpoint was written yet")
            raise NonFiniteLossError(
                f"{self.state.nonfinite_streak} consecutive non-finite losses (limit "
                f"train.max_consecutive_nonfinite={limit}) at iteration {it}; {where}. "
                "Lower optim.base_lr, raise warm-up, or check the data."
            )


def is_logged(done: int, log_every: int, end: int) -> bool:
    """Whether the step that brings the run to ``done`` iterations gets a log line and a
    ``metrics.jsonl`` record (and so computes the diagnostics)."""
    return done % log_every == 0 or done == end


def format_stats(stats: dict[str, float], ln_k: dict[str, float]) -> str:
    """The diagnostics of a log line, short: per loss ``H(t)/H(s)/lnK`` (teacher and student
    entropy, nats), prototypes used, bottleneck norm; CLS spread; gradient norms."""
    parts = []
    for loss, lk in ln_k.items():
        if f"{loss}_teacher_entropy" in stats:
            parts.append(
                f"{loss} H(t)/H(s)/lnK={stats[f'{loss}_teacher_entropy']:.3f}/{stats[f'{loss}_student_entropy']:.3f}/{lk:.3f}"
                f" used={stats[f'{loss}_prototypes_used']:.0f} bneck={stats[f'{loss}_bottleneck_norm']:.3g}"
            )
    if "cls_spread_student" in stats:
        teacher = f"/{stats['cls_spread_teacher']:.3f}" if "cls_spread_teacher" in stats else ""  # none without DINO/iBOT
        parts.append(f"spread s{'/t' if teacher else ''}={stats['cls_spread_student']:.3f}{teacher}")
    norms = {k[len("grad_norm_"):]: v for k, v in stats.items() if k.startswith("grad_norm_")}
    if norms:
        parts.append("gnorm " + " ".join(f"{k}={v:.3g}" for k, v in norms.items()))
    return " ".join(parts)


def _fmt_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"

