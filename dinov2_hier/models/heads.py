"""DINO / iBOT projection head."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised prototypes.

    ``[..., in_dim] -> [..., out_dim]`` (``[n, in_dim]`` for class tokens, ``[n, t, in_dim]``
    for patch tokens). ``mlp`` has ``nlayers`` Linear layers (GELU between them, no
    batch norm), the last one mapping to ``bottleneck_dim``. ``last_layer`` is a bias-free
    Linear whose rows are L2-normalised on every forward (weight norm with the gain fixed
    at 1), so each output is a cosine similarity in [-1, 1]. Its parameters live under
    the ``last_layer.`` prefix, which training freezes during the first epoch.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
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
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize(self.mlp(x), dim=-1, p=2, eps=1e-6)
        prototypes = F.normalize(self.last_layer.weight, dim=1, p=2)  # [out_dim, bottleneck]
        return F.linear(z, prototypes)
