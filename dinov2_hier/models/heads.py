"""DINO / iBOT projection head."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation (Salimans & Kingma, 2016).

    Row ``k`` of the effective weight is ``weight_g[k] * weight_v[k] / ||weight_v[k]||``:
    ``weight_v [out, in]`` gives each prototype's direction, ``weight_g [out, 1]`` its
    length. The names and shapes are those of DINO / DINOv2's ``last_layer`` (made by
    ``torch.nn.utils.weight_norm``), so released heads load as they are.

    ``trainable_gain=False`` is DINO's ``norm_last_layer=True``: ``weight_g`` stays at 1,
    so every output is a cosine similarity in ``[-1, 1]``. DINOv2 trains the gain, which
    lets a prototype's logits grow beyond 1 / temperature (docs/training-dynamics.md).
    A state dict with a plain ``weight`` (checkpoints written before the gain existed)
    loads as ``weight_v = weight`` and ``weight_g = 1``, which computes the same function.
    """

    def __init__(self, in_features: int, out_features: int, trainable_gain: bool = True) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1), requires_grad=trainable_gain)

    def prototypes(self) -> Tensor:
        """``[out, in]`` effective weight: rows of length ``weight_g``."""
        return F.normalize(self.weight_v, dim=1, p=2) * self.weight_g

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.prototypes())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001
        upgrade_last_layer_keys(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def upgrade_last_layer_keys(state_dict: dict, prefix: str | None = None) -> dict:
    """Rewrite, in place, a plain ``<prefix>weight`` of a :class:`WeightNormLinear` (state
    dicts written before the gain existed) as ``weight_v`` with ``weight_g = 1``; the same
    function. ``prefix=None``: every ``...last_layer.weight`` key. Returns ``state_dict``."""
    prefixes = [prefix] if prefix is not None else [k[: -len("weight")] for k in state_dict if k.endswith("last_layer.weight")]
    for p in prefixes:
        if p + "weight" in state_dict and p + "weight_v" not in state_dict:
            weight = state_dict.pop(p + "weight")
            state_dict[p + "weight_v"] = weight
            state_dict[p + "weight_g"] = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    return state_dict


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    ``[..., in_dim] -> [..., out_dim]`` (``[n, in_dim]`` for class tokens, ``[n, t, in_dim]``
    for patch tokens). ``mlp`` has ``nlayers`` Linear layers (GELU between them, no
    batch norm), the last one mapping to ``bottleneck_dim``. ``last_layer`` is a
    :class:`WeightNormLinear` (gain trainable unless ``norm_last_layer``); its parameters
    live under the ``last_layer.`` prefix, which training freezes during the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(nlayers):
            if i > 0:
                layers.append(nn.GELU())
            layers.append(nn.Linear(widths[i], widths[i + 1]))
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, trainable_gain=not norm_last_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # As DINO / DINOv2, whose last layer keeps nn.Linear's default init (the MLP's
        # init is applied before it is made): U(-1/sqrt(in), 1/sqrt(in)). Only directions
        # reach the output, but AdamW's step is relative to this scale.
        nn.init.kaiming_uniform_(self.last_layer.weight_v, a=math.sqrt(5))

    def bottleneck(self, x: Tensor) -> Tensor:
        """``[..., in_dim] -> [..., bottleneck_dim]``: the MLP output before normalisation."""
        return self.mlp(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.prototype_logits(self.bottleneck(x))

    def prototype_logits(self, bottleneck: Tensor) -> Tensor:
        """``[..., bottleneck_dim]`` MLP output -> ``[..., out_dim]``: cosine similarity
        of the normalised bottleneck with each prototype, times the prototype's gain."""
        return self.last_layer(F.normalize(bottleneck, dim=-1, p=2, eps=1e-6))
