"""Which losses a config computes, and the checks of a run without self-supervision.

A weight of 0 switches a self-supervised loss off entirely (not computed and multiplied
by 0): ``dino.loss_weight: 0`` means no DINO loss, no DINO-head forward, no local-crop
forward and no DINO diagnostics; with ``ibot.loss_weight: 0`` too, the teacher does no
forward pass at all (nothing needs its targets). The total is then the supervised terms
(``supervision.losses``), plus KoLeo when ``dino.koleo_loss_weight`` > 0: KoLeo spreads
the student's CLS tokens and needs neither DINO nor the teacher (its key sits under
``dino`` for DINOv2's sake only). Fazeli et al.'s SupCon arm
(``configs/train/vits14_small_supcon_only.yaml``) is such a run.

Without DINO and iBOT the teacher stays what it is otherwise, an EMA of the student
backbone (``teacher.momentum_teacher`` schedule): evaluation and export read the teacher
backbone and keep working; it costs one ``lerp`` over the weights per step. The DINO head
stays in the model (checkpoints keep their layout) but is frozen: every trainable
parameter must get a gradient each step under DDP, as for the mask token without iBOT.

Refused with a :class:`~dinov2_hier.config.ConfigError` (exit 2), one line naming the keys:
a config that trains nothing (no DINO, no iBOT, no supervised term: KoLeo alone is a
regulariser, not an objective), and local crops without DINO (only the DINO loss uses them;
computing and dropping them would cost a student forward per step for nothing).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from ..config import ConfigError

logger = logging.getLogger("dinov2_hier.train")


@dataclass(frozen=True)
class LossPlan:
    """The losses of a step, from the config's weights (> 0 = on)."""

    dino: bool
    ibot: bool
    koleo: bool
    supervised: bool
    ibot_separate_head: bool

    @property
    def teacher_forward(self) -> bool:
        """Whether the teacher computes targets (DINO's or iBOT's) each step."""
        return self.dino or self.ibot

    @property
    def dino_head_used(self) -> bool:
        """Whether the DINO head takes part in the loss (DINO, or iBOT sharing its head)."""
        return self.dino or (self.ibot and not self.ibot_separate_head)

    @property
    def self_supervised(self) -> bool:
        return self.dino or self.ibot or self.koleo


def plan_losses(cfg: DictConfig) -> LossPlan:
    """The :class:`LossPlan` of ``cfg`` (no checks; :func:`check_loss_plan` checks)."""
    entries = OmegaConf.select(cfg, "supervision.losses", default=None) or []
    return LossPlan(
        dino=float(cfg.dino.loss_weight) > 0,
        ibot=float(cfg.ibot.loss_weight) > 0,
        koleo=float(cfg.dino.koleo_loss_weight) > 0,
        supervised=len(entries) > 0,
        ibot_separate_head=bool(cfg.ibot.separate_head),
    )


def check_loss_plan(cfg: DictConfig) -> LossPlan:
    """The plan of ``cfg``; ConfigError (one line naming the keys) for a config that trains
    nothing or that asks for local crops without DINO (module docstring)."""
    plan = plan_losses(cfg)
    if not (plan.dino or plan.ibot or plan.supervised):
        koleo = (f" (dino.koleo_loss_weight={cfg.dino.koleo_loss_weight} alone is a regulariser, not an objective)"
                 if plan.koleo else "")
        raise ConfigError(
            f"nothing to train: dino.loss_weight={cfg.dino.loss_weight}, ibot.loss_weight={cfg.ibot.loss_weight} "
            f"and supervision.losses=[]{koleo}; set a loss weight > 0 or add a supervised term"
        )
    local = int(OmegaConf.select(cfg, "crops.local_crops_number", default=0) or 0)
    if local > 0 and not plan.dino:
        raise ConfigError(
            f"crops.local_crops_number={local} but dino.loss_weight=0: only the DINO loss uses local crops; "
            "set crops.local_crops_number=0"
        )
    return plan


def log_loss_plan(plan: LossPlan) -> None:
    """One log line for a run without DINO (what is computed, what the teacher is)."""
    if plan.dino:
        return
    computed = [name for name, on in (("iBOT", plan.ibot), ("KoLeo", plan.koleo), ("supervised terms", plan.supervised))
                if on]
    teacher = ("computes iBOT targets" if plan.ibot
               else "does no forward pass (an EMA of the student, for evaluation and export)")
    logger.info("DINO off (dino.loss_weight=0): the loss is %s; no DINO head, local crops or DINO diagnostics; "
                "the teacher %s", " + ".join(computed), teacher)
