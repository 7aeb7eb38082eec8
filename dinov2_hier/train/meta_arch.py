"""Student, teacher and losses of the DINOv2 recipe with two global crops (and optional
local crops, which only the student sees and only the DINO loss uses).

``SSLMetaArch.compute_losses`` is the one place where a training step's forward pass
lives; the training loop, the benchmark and the SLURM job all call it.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from .. import distributed
from ..losses import DINOLoss, iBOTPatchLoss, KoLeoLoss, LossInputError
from ..losses import diagnostics
from ..losses.swav import TARGETS, SwAVTargets
from ..hierarchy import Hierarchy
from ..config import ConfigError
from ..models import BackboneSpec, DINOHead
from ..models.vision_transformer import DROP_PATH_MODES, DROP_PATH_SCHEDULES, RESIDUAL_STREAMS
from .loss_plan import check_loss_plan, log_loss_plan
from .supervision import build_supervised_heads

@dataclass(frozen=True)
class TeacherTargets:
    """Teacher outputs of one step.

    cls_probs: ``[2B, K]`` crop-major DINO targets (None without DINO).
    patch_probs: ``[M, K_ibot]`` iBOT targets of the masked patches (``M`` may be 0).
    cls_tokens: ``[2B, D]`` the teacher's CLS tokens (for the diagnostics).
    """

    cls_probs: Tensor | None
    patch_probs: Tensor | None
    cls_tokens: Tensor


#: ``supervision.crops``: which global crops' CLS tokens the supervised terms see.
SUPERVISED_CROPS = ("all", "unmasked")

#: At most this many masked patches (evenly strided) enter the iBOT diagnostics: their
#: entropies cost a pass over [rows, K] each, which over all M rows would slow a ViT-S step.
DIAGNOSTIC_PATCH_ROWS = 1024


def build_backbone_from_config(cfg: DictConfig, drop_path_rate: float | None = None) -> nn.Module:
    """The ViT described by ``cfg`` (:meth:`BackboneSpec.from_config`) with its training-time
    settings: ``student.drop_path_rate`` (or ``drop_path_rate``) and ``student.drop_path_schedule``."""
    # Configs saved before student.drop_path_schedule existed ran the linear schedule.
    schedule = _choice(cfg, "student.drop_path_schedule", DROP_PATH_SCHEDULES, if_absent="linear")
    return BackboneSpec.from_config(cfg).build(
        drop_path_rate=cfg.student.drop_path_rate if drop_path_rate is None else drop_path_rate,
        drop_path_schedule=schedule,
    )


def _choice(cfg: DictConfig, key: str, choices: tuple[str, ...], if_absent: str | None = None) -> str:
    """``cfg``'s value at dotted ``key``, which must be one of ``choices``; ``if_absent``
    stands for a key the config does not have (one saved before the key existed)."""
    value = OmegaConf.select(cfg, key, default=if_absent)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


@contextlib.contextmanager
def _config_section(section: str):
    """Turn a loss's argument error into a ConfigError naming the config section (exit 2)."""
    try:
        yield
    except LossInputError as exc:
        raise ConfigError(f"{section}: {exc}") from None


def _build_head(head_cfg: DictConfig, in_dim: int) -> DINOHead:
    return DINOHead(
        in_dim=in_dim,
        out_dim=head_cfg.head_n_prototypes,
        hidden_dim=head_cfg.head_hidden_dim,
        bottleneck_dim=head_cfg.head_bottleneck_dim,
        nlayers=head_cfg.head_nlayers,
        # Configs saved before the key existed ran with the gain fixed at 1.
        norm_last_layer=bool(OmegaConf.select(head_cfg, "head_norm_last_layer", default=True)),
    )


class SSLMetaArch(nn.Module):
    """Student and EMA teacher (backbone + DINO head [+ iBOT head]), the SSL losses and
    the optional supervised terms.

    Supervised terms (``cfg.supervision.losses``, labels resolved onto ``hierarchy``) are
    student-side modules called with the student's CLS tokens of both global crops and
    the batch's targets: they reuse the self-supervised forward pass (no second backbone
    pass), are optimised with the student and left out of the teacher EMA.

    ``forward(batch, teacher_temp)`` is :meth:`compute_losses`, so that data-parallel
    wrappers (DDP, FSDP2), which hook ``forward``, see the whole step (docs/distributed.md).
    Across ranks: Sinkhorn-Knopp and centring reduce over the global batch, contrastive
    supervised terms gather the CLS tokens of all ranks (``supervision.contrast_across_ranks``),
    KoLeo and the classification terms are per-rank means (averaged by DDP).
    """

    def __init__(self, cfg: DictConfig, hierarchy: Hierarchy | None = None):
        super().__init__()
        self.cfg = cfg
        # Which losses are on (a weight of 0 = not computed at all; loss_plan.py); refuses
        # a config that trains nothing, or local crops without DINO.
        self.plan = check_loss_plan(cfg)
        log_loss_plan(self.plan)
        backbone = build_backbone_from_config(cfg)
        backbone.grad_checkpointing = bool(cfg.student.grad_checkpointing)
        # Training-time settings (not properties of the weights): evaluation builds its
        # backbone from the checkpoint's config with the defaults.
        backbone.residual_stream = _choice(cfg, "compute.residual_stream", RESIDUAL_STREAMS)
        backbone.drop_path_mode = _choice(cfg, "student.drop_path_mode", DROP_PATH_MODES)
        embed_dim = backbone.embed_dim
        student = {"backbone": backbone, "dino_head": _build_head(cfg.dino, embed_dim)}
        self.ibot_enabled = cfg.ibot.loss_weight > 0
        self.separate_ibot_head = self.ibot_enabled and cfg.ibot.separate_head
        if self.separate_ibot_head:
            student["ibot_head"] = _build_head(cfg.ibot, embed_dim)
        if not self.ibot_enabled:
            # Without iBOT no crop is masked: the mask token takes no part in the loss. Freeze
            # it so that every trainable parameter gets a gradient each step (DDP requires it).
            backbone.mask_token.requires_grad_(False)
        if not self.plan.dino_head_used:
            # dino.loss_weight=0 (and iBOT off or on its own head): the DINO head is never run.
            # It stays (checkpoints keep their layout) but frozen, for the same reason.
            student["dino_head"].requires_grad_(False)
        self.student = nn.ModuleDict(student)
        # The teacher needs no stochastic depth; it is a frozen copy updated by EMA.
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

        # The losses check their arguments, which are config values: errors name the section.
        with _config_section("dino"):
            self.dino_loss = DINOLoss(
                cfg.dino.head_n_prototypes,
                student_temp=cfg.dino.student_temp,
                centering=cfg.dino.centering,
                center_momentum=cfg.dino.center_momentum,
                sk_iterations=cfg.dino.sk_iterations,
            )
        # dino.targets=swav: the DINO targets are the student's own Sinkhorn-Knopp codes
        # (losses/swav.py, docs/swav.md); the EMA teacher stays (iBOT, evaluation, export).
        self.swav: SwAVTargets | None = None
        if _choice(cfg, "dino.targets", TARGETS, if_absent="teacher") == "swav":
            with _config_section("dino"):
                self.swav = SwAVTargets(
                    int(cfg.dino.swav_queue_length),
                    cfg.dino.head_bottleneck_dim,
                    round(cfg.dino.swav_queue_start_epochs * cfg.train.epoch_length),
                    sk_iterations=cfg.dino.sk_iterations,
                )
        ibot_cfg = cfg.ibot if self.separate_ibot_head else cfg.dino
        with _config_section("ibot"):
            self.ibot_loss = iBOTPatchLoss(
                ibot_cfg.head_n_prototypes,
                student_temp=cfg.ibot.student_temp,
                centering=cfg.ibot.centering,
                center_momentum=cfg.ibot.center_momentum,
                sk_iterations=cfg.ibot.sk_iterations,
            )
        self.koleo_loss = KoLeoLoss()
        # Student-side supervised heads: optimised with the student, not part of the EMA teacher.
        self.supervised, self.supervised_weights = build_supervised_heads(cfg, hierarchy, embed_dim)
        self.contrast_across_ranks = bool(cfg.supervision.contrast_across_ranks)
        # Configs saved before supervision.crops existed gave the terms every crop.
        self.supervise_unmasked_only = _choice(cfg, "supervision.crops", SUPERVISED_CROPS, if_absent="all") == "unmasked"

    # -- modes --------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # never drop paths in the teacher
        return self

    @property
    def n_blocks(self) -> int:
        return self.student["backbone"].n_blocks

    def trainable_modules(self) -> nn.ModuleDict:
        """What the optimizer updates: student networks and supervised heads."""
        return nn.ModuleDict({"student": self.student, "supervised": self.supervised})

    def gradient_groups(self) -> dict[str, list[Tensor]]:
        """Trainable parameters by module, in :meth:`trainable_modules` order: ``backbone``,
        ``dino_head``, ``ibot_head`` (separate head only) and ``supervised`` (when there
        are supervised terms). DINOv2 clips each module's gradient norm on its own
        (``optim.clip_grad_mode=per_module``), and the step logs each group's norm."""
        groups = {name: [p for p in module.parameters() if p.requires_grad] for name, module in self.student.items()}
        groups["supervised"] = [p for p in self.supervised.parameters() if p.requires_grad]
        return {name: params for name, params in groups.items() if params}

    # -- pieces of a step ---------------------------------------------------------------
    def _ibot_head(self, which: nn.ModuleDict) -> nn.Module:
        return which["ibot_head"] if self.separate_ibot_head else which["dino_head"]

    @torch.no_grad()
    def teacher_targets(
        self, crops: Tensor, mask_indices: Tensor, teacher_temp: float, mask_valid: Tensor | None = None
    ) -> TeacherTargets:
        """Teacher outputs for ``crops [2B,3,S,S]`` (crop-major).

        The patch targets are taken at the flat positions ``mask_indices [M]`` of the
        ``[2B, N]`` patch grid: the teacher sees the unmasked crop. ``mask_valid`` (bool
        ``[M]``) marks the real masked patches of a padded buffer; padding gets zero
        targets. No host synchronisation: a batch without any masked patch on any rank
        gives all-zero targets from the normalisation itself.
        """
        out = self.teacher["backbone"](crops)
        cls_probs = None
        if self.plan.dino:
            cls_logits = self.teacher["dino_head"](out["x_norm_clstoken"])
            cls_probs = self.dino_loss.teacher_probs(cls_logits, teacher_temp)
        patch_probs = None
        if self.ibot_enabled:
            patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
            patch_logits = self._ibot_head(self.teacher)(patches)
            patch_probs = self.ibot_loss.teacher_probs(patch_logits, teacher_temp, valid=mask_valid)
        return TeacherTargets(cls_probs=cls_probs, patch_probs=patch_probs, cls_tokens=out["x_norm_clstoken"])

    def forward(
        self, batch: dict, teacher_temp: float, with_stats: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Same as :meth:`compute_losses` (what DDP / FSDP2 call)."""
        return self.compute_losses(batch, teacher_temp, with_stats)

    def compute_losses(
        self, batch: dict, teacher_temp: float, with_stats: bool = True
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Forward pass of one step.

        Args:
            batch: collated batch on the model's device: ``global_crops [2B,3,S,S]``,
                ``masks bool [2B,N]``, ``mask_indices long [M]``, ``masks_weight [M]``
                (0 on the padding of the fixed-size masked-patch buffer), optionally
                ``local_crops [nL*B,3,s,s]`` (crop-major; ``crops.local_crops_number``,
                absent when 0: then nothing is computed for them) and,
                for supervised terms, ``targets long [B]`` (``-1`` = unlabelled; with
                ``supervision.crops=unmasked`` the terms see only the crops without an
                iBOT mask: masked crops' rows count as unlabelled), for terms that
                declare ``uses_domains`` (``boda``) ``domains long [B]`` (index into
                ``supervision.domains``; passed to those terms only) and
                optionally ``supervision_weight`` (a Python float, default 1.0, from
                ``supervision.start_iteration``: 0.0 before it) multiplying every
                supervised term's weight in ``total``. At 0 the terms are still computed
                and logged (same graph and cost every step; their gradients are exactly 0).
            teacher_temp: teacher softmax temperature of this iteration.
            with_stats: compute the diagnostics; the trainer asks for them only on the
                steps it logs (they cost ~4% of an eager ViT-S/14 step: several passes over
                the ``[rows, K]`` targets and logits).
        Returns:
            ``(losses, stats)``. ``losses``: scalar losses ``dino``, ``ibot``, ``koleo``
            (each only when its weight is > 0: ``dino.loss_weight=0`` computes no DINO loss,
            no DINO diagnostics, no local crops and, with iBOT off, no teacher forward; see
            :mod:`.loss_plan`), one per supervised term, and ``total`` (their weighted sum,
            the value that is back-propagated). ``stats``: detached float32 scalars that show whether the
            self-distillation learns (:mod:`dinov2_hier.losses.diagnostics`): entropies of
            the teacher targets and student predictions in nats, prototypes the teacher's
            targets use, the heads' bottleneck norms before normalisation, and the spread
            of the student's and teacher's CLS tokens; empty when ``with_stats`` is false.
        """
        crops = batch["global_crops"]
        n_crops = crops.shape[0]
        mask_indices = batch["mask_indices"]
        # Real masked patches have weight 1 / (masked patches of their crop) > 0, padding 0.
        mask_valid = batch["masks_weight"] > 0
        # Without DINO and iBOT nothing needs teacher targets: no teacher forward at all.
        targets = self.teacher_targets(crops, mask_indices, teacher_temp, mask_valid) if self.plan.teacher_forward else None

        masks = batch["masks"] if self.ibot_enabled else None
        out = self.student["backbone"](crops, masks=masks)
        cls_tokens = out["x_norm_clstoken"]

        losses: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        total: Tensor | None = None
        if self.plan.dino:
            dino_head = self.student["dino_head"]
            cls_bottleneck = dino_head.bottleneck(cls_tokens)
            cls_logits = dino_head.prototype_logits(cls_bottleneck)
            if self.swav is not None:  # SwAV: the student's own codes (teacher_temp = epsilon) replace the teacher's
                codes = self.swav.codes(cls_bottleneck, cls_logits, dino_head.prototype_logits, teacher_temp)
                targets = replace(targets, cls_probs=codes)
            losses["dino"] = self.dino_loss(cls_logits, targets.cls_probs, self._student_local_logits(batch))
            total = self.cfg.dino.loss_weight * losses["dino"]
            if with_stats:
                stats = {
                    "dino_teacher_entropy": diagnostics.mean_entropy(targets.cls_probs),
                    "dino_student_entropy": diagnostics.mean_entropy_of_logits(cls_logits, self.dino_loss.student_temp),
                    "dino_prototypes_used": diagnostics.prototypes_used(targets.cls_probs),
                    "dino_bottleneck_norm": diagnostics.mean_norm(cls_bottleneck),
                }
        if with_stats:
            stats["cls_spread_student"] = diagnostics.token_spread(cls_tokens)
            if targets is not None:
                stats["cls_spread_teacher"] = diagnostics.token_spread(targets.cls_tokens)

        if self.ibot_enabled:
            patches = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
            ibot_head = self._ibot_head(self.student)
            patch_bottleneck = ibot_head.bottleneck(patches)
            patch_logits = ibot_head.prototype_logits(patch_bottleneck)
            losses["ibot"] = self.ibot_loss(patch_logits, targets.patch_probs, batch["masks_weight"], n_crops)
            total = _plus(total, self.cfg.ibot.loss_weight * losses["ibot"])
            if with_stats:
                stats.update(self._ibot_stats(patch_bottleneck, patch_logits, targets.patch_probs, mask_valid))

        if self.cfg.dino.koleo_loss_weight > 0:
            # KoLeo spreads each crop's CLS tokens over the sphere; summed over the two crops.
            losses["koleo"] = sum(self.koleo_loss(chunk) for chunk in cls_tokens.chunk(2))
            total = _plus(total, self.cfg.dino.koleo_loss_weight * losses["koleo"])

        gathered: tuple[Tensor, Tensor] | None = None
        supervision_weight = float(batch.get("supervision_weight", 1.0))
        supervised_targets = batch.get("targets")
        if self.supervised and self.supervise_unmasked_only and masks is not None:
            # One target per crop row; crops carrying an iBOT mask count as unlabelled.
            supervised_targets = torch.where(masks.any(dim=1), -1, supervised_targets.repeat(2))
        for name, term in self.supervised.items():
            if term.uses_domains:  # boda: per rank, centroids all-reduced inside the term
                losses[name] = term(cls_tokens, supervised_targets, domains=batch["domains"])
            elif term.pairwise and self.contrast_across_ranks and distributed.get_world_size() > 1:
                if gathered is None:
                    gathered = gather_crop_major(cls_tokens, supervised_targets)
                losses[name] = term(*gathered)
            else:
                losses[name] = term(cls_tokens, supervised_targets)
            total = _plus(total, supervision_weight * self.supervised_weights.get(name, 1.0) * losses[name])

        losses["total"] = total
        return losses, stats

    def _student_local_logits(self, batch: dict) -> Tensor | None:
        """The student's DINO-head logits ``[nL*B, K]`` of the batch's ``local_crops``
        (crop-major, no masks; the backbone interpolates its position embeddings to their
        smaller patch grid), or None when the batch has none. The teacher never sees them;
        KoLeo, iBOT, the supervised terms and the diagnostics use the global crops only."""
        local_crops = batch.get("local_crops")
        if local_crops is None:
            return None
        if not torch.compiler.is_compiling():
            # compute.compile=backbone: the student backbone compiles a second graph for the
            # local crops' shape. Marked static, or automatic dynamic shapes would make that
            # graph dynamic in batch and image size (which could then serve the global crops
            # too). Under compute.compile=forward both shapes are in the one step graph.
            torch._dynamo.mark_static(local_crops)
        out = self.student["backbone"](local_crops)
        return self.student["dino_head"](out["x_norm_clstoken"])

    def _ibot_stats(self, bottleneck: Tensor, logits: Tensor, probs: Tensor, valid: Tensor) -> dict[str, Tensor]:
        """iBOT diagnostics on at most :data:`DIAGNOSTIC_PATCH_ROWS` evenly strided masked
        patches (padding rows weigh 0). ``M`` is fixed for a run, so the stride is too."""
        stride = max(1, logits.shape[0] // DIAGNOSTIC_PATCH_ROWS)
        rows = slice(None, None, stride)
        weights = valid[rows].float()
        return {
            "ibot_teacher_entropy": diagnostics.mean_entropy(probs[rows], weights),
            "ibot_student_entropy": diagnostics.mean_entropy_of_logits(logits[rows], self.ibot_loss.student_temp, weights),
            "ibot_prototypes_used": diagnostics.prototypes_used(probs[rows], weights),
            "ibot_bottleneck_norm": diagnostics.mean_norm(bottleneck[rows], weights),
        }

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, with foreach kernels.

        Under FSDP2 both are sharded alike (same shapes, same mesh), so the update runs on
        each rank's local shards (``DTensor.to_local()`` views), without communication.
        """
        t_params = [_local(p) for p in self.teacher.parameters()]
        s_params = [_local(p).detach() for p in self.student.parameters()]
        torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)


def _plus(total: Tensor | None, term: Tensor) -> Tensor:
    """``total + term``, or ``term`` itself for the first term (``dino.loss_weight=0``)."""
    return term if total is None else total + term


def _local(param: Tensor) -> Tensor:
    """The local shard of a DTensor parameter (a view), or the tensor itself."""
    return param.to_local() if hasattr(param, "to_local") else param


def gather_crop_major(cls_tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """CLS tokens and targets of all ranks as one crop-major global batch.

    Args:
        cls_tokens: ``[2B_r, D]`` this rank's tokens, crop-major (``B_r`` may differ per rank).
        targets: ``long [B_r]`` (one per image) or ``[2B_r]`` (one per crop row, crop-major).
    Returns:
        ``tokens [2 * sum_r B_r, D]`` ordered crop 0 of rank 0's images, crop 0 of rank 1's,
        ..., then crop 1 in the same image order, and ``targets [sum_r B_r]`` in that image
        order (per-row targets: ``[2 * sum_r B_r]`` in the tokens' order): exactly the batch one process would see with the ranks' batches concatenated.
        The tokens keep their autograd graph: each rank's gradient is summed over all ranks.
    """
    sizes = distributed.gather_sizes(cls_tokens.shape[0] // 2, cls_tokens.device)
    token_parts = distributed.all_gather_rows(cls_tokens, [2 * n for n in sizes], differentiable=True)
    tokens = _crop_major(token_parts, sizes)
    if targets.shape[0] == cls_tokens.shape[0]:  # one target per crop row
        target_parts = distributed.all_gather_rows(targets.to(cls_tokens.device), [2 * n for n in sizes])
        return tokens, _crop_major(target_parts, sizes)
    return tokens, torch.cat(distributed.all_gather_rows(targets.to(cls_tokens.device), sizes))


def _crop_major(parts: list[Tensor], sizes: list[int]) -> Tensor:
    """Each rank's crop-major ``[2 n_r, ...]`` rows -> crop 0 of all ranks, then crop 1."""
    return torch.cat([p[:n] for p, n in zip(parts, sizes)] + [p[n:] for p, n in zip(parts, sizes)])
