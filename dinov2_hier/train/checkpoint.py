"""Full training checkpoints: atomic writes, discovery for auto-resume, safe loading.

A checkpoint is a plain dict of tensors, numbers and strings, so it loads with
``torch.load(..., weights_only=True)``: no pickled code is ever executed.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..io import atomic_torch_save, load_error_message

CHECKPOINT_DIR = "checkpoints"
TEACHER_FILE = "teacher_backbone.pt"
_NAME_RE = re.compile(r"^ckpt_(\d+)\.pt$")


class CheckpointError(ValueError):
    """A checkpoint is unreadable or does not match the model."""


def checkpoint_path(output_dir: Path, iteration: int) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR / f"ckpt_{iteration:08d}.pt"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """``(iteration, path)`` of the full checkpoints in ``output_dir``, oldest first.
    Temporary files of an interrupted write never match the name pattern."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _NAME_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(state: dict, output_dir: Path, iteration: int, keep: int) -> Path:
    """Write ``state`` atomically as the checkpoint of ``iteration``; keep the newest ``keep``
    (0 = all). Older ones are removed only after the new one is in place."""
    path = checkpoint_path(output_dir, iteration)
    atomic_torch_save(state, path)
    if keep > 0:
        for _, old in list_checkpoints(output_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(load_error_message(path, exc)) from None


def check_state_dict_matches(own: dict, state_dict: dict, source: Path) -> None:
    """Raise :class:`CheckpointError` naming the first missing, unexpected or mis-shaped key
    of ``state_dict`` against the model's own ``own`` state dict, or the first integer or
    bool tensor where the model has floating weights (with its dtype)."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        first = f"missing key '{missing[0]}'" if missing else f"unexpected key '{unexpected[0]}'"
        raise CheckpointError(
            f"{source}: checkpoint does not match the model ({first}; {len(missing)} missing, "
            f"{len(unexpected)} unexpected). Was it written with a different config?"
        )
    for key, value in state_dict.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{source}: shape mismatch at '{key}': checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}"
            )
    from ..models.weights import check_floating

    check_floating(own, state_dict, str(source), CheckpointError)


def load_model_state(model: torch.nn.Module, state_dict: dict, source: Path) -> None:
    """Strict load that names the first missing, unexpected or mis-shaped key."""
    check_state_dict_matches(model.state_dict(), state_dict, source)
    model.load_state_dict(state_dict)
