"""Vision Transformer in the DINOv2 layout, written with plain PyTorch.

Parameter names match DINOv2 (``cls_token``, ``pos_embed``, ``register_tokens``,
``mask_token``, ``patch_embed.proj``, ``blocks.{i}.{norm1,attn.qkv,attn.proj,ls1.gamma,
norm2,mlp.*,ls2.gamma}``, ``norm``) so DINOv2 and DinoBloom backbone checkpoints load
without renaming. Attention uses ``F.scaled_dot_product_attention`` (no xformers).

Shapes: ``n`` images, ``D`` embedding width, ``R`` register tokens, ``N = (H/p) * (W/p)``
patch tokens of an ``H x W`` input with patch side ``p`` pixels.

Length (~520 lines): one network; its blocks, drop-path modes and position-embedding
interpolation are the pieces DINOv2's parameter names and the training step's speed need.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def interpolate_pos_embed(
    pos_embed: Tensor,
    new_grid: tuple[int, int],
    interpolate_offset: float = 0.1,
    antialias: bool = False,
) -> Tensor:
    """Resample patch position embeddings to another patch grid (bicubic).

    ``pos_embed [1, 1 + M*M, D]`` holds the class-token embedding followed by a square
    ``M x M`` grid in row-major order; returns ``[1, 1 + h*w, D]`` for ``new_grid = (h, w)``
    (rows, columns) in the dtype of the input. The class-token entry is kept as is; an
    unchanged grid returns an exact copy.

    With ``interpolate_offset > 0`` the resize is expressed as a scale factor
    ``(h + offset) / M`` (DINOv2's choice): the output size floors to ``h`` while the
    sampling positions match those DINOv2 checkpoints were evaluated with.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape [1, 1 + M*M, D], got {tuple(pos_embed.shape)}")
    h, w = int(new_grid[0]), int(new_grid[1])
    if h <= 0 or w <= 0:
        raise ValueError(f"new_grid must be positive, got {tuple(new_grid)}")
    n_old = pos_embed.shape[1] - 1
    side = math.isqrt(n_old)
    if side * side != n_old:
        raise ValueError(f"pos_embed holds {n_old} patch positions, which is not a square grid")
    if (h, w) == (side, side):
        return pos_embed.clone()

    dim = pos_embed.shape[-1]
    cls_pos = pos_embed[:, :1]
    # Bicubic in float32: half-precision interpolation is not available on every backend.
    grid = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if interpolate_offset:
        scale = ((h + interpolate_offset) / side, (w + interpolate_offset) / side)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=antialias)
    else:
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", antialias=antialias)
    if tuple(grid.shape[-2:]) != (h, w):
        raise ValueError(f"interpolated grid {tuple(grid.shape[-2:])} != requested {(h, w)}")
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos_embed.dtype)
    return torch.cat((cls_pos, patch_pos), dim=1)


def drop_path(x: Tensor, rate: float, training: bool) -> Tensor:
    """Stochastic depth per sample: zero a whole residual branch of ``x [n, ...]`` with
    probability ``rate`` and scale kept ones by ``1 / (1 - rate)`` (expectation unchanged)."""
    if rate == 0.0 or not training:
        return x
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class _GatherRows(torch.autograd.Function):
    """``x[order]`` along dim 0 for a permutation ``order`` whose inverse is ``inverse``.

    Autograd's backward of an index is a scatter into a zero tensor of ``x``'s size; for a
    permutation the gather ``grad[inverse]`` gives the same gradient in one pass."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x[order]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def add_on_subset(x: Tensor, branch: Callable[[Tensor], Tensor], rate: float) -> Tensor:
    """``x + branch(x)`` with stochastic depth by batch subset (DINOv2's
    ``drop_add_residual_stochastic_depth``): ``branch`` runs only on ``kept = max(floor(n *
    (1 - rate)), 1)`` rows of ``x [n, ...]`` drawn without replacement, whose results are
    added back scaled by ``n / kept``; the other rows skip the branch. The expectation
    equals per-sample drop path's, and the branch costs ``kept / n`` of its FLOPs.

    Written as a row permutation: shuffle the rows, update the leading ``kept``, shuffle
    back. Each shuffle's backward is the other shuffle, where a gather + ``index_put``
    would scatter into full-size zero tensors in the backward; on an H200 the shipped ViT-L
    step ran 3.9% faster this way (``docs/performance.md``, "What the shipped settings give").
    """
    n = x.shape[0]
    kept = max(int(n * (1.0 - rate)), 1)
    # A random permutation as the argsort of uniform draws: torch.compile generates both on
    # the device, where randperm stays an ATen call with host-side work on every call.
    order = torch.rand(n, device=x.device).argsort()
    inverse = order.argsort()
    head, tail = _GatherRows.apply(x, order, inverse).split([kept, n - kept])
    updated = torch.cat([head + branch(head).to(x.dtype) * (n / kept), tail])
    return _GatherRows.apply(updated, inverse, order)


class DropPath(nn.Module):
    """Module wrapper of :func:`drop_path`; identity in eval mode."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = float(rate)

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.rate, self.training)

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma [D]`` on a residual branch (CaiT / DINOv2).

    ``in_input_dtype`` (set by the backbone's ``residual_stream``): multiply in the
    branch's dtype (bf16 under autocast, as with DINOv2's half-precision parameters)
    instead of promoting it to float32.
    """

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))
        self.in_input_dtype = False

    def forward(self, x: Tensor) -> Tensor:
        return x * (self.gamma.to(x.dtype) if self.in_input_dtype else self.gamma)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches to tokens: ``[n, C, H, W] -> [n, (H/p)*(W/p), D]``.

    The weights are a ``Conv2d`` (``proj``, DINOv2's names and shapes), but with stride
    equal to kernel size the convolution is a matrix product of the flattened patches
    with the flattened kernel, which is what runs: on an H200 cuDNN picked a slow
    implicit-GEMM kernel for the bf16 14 px convolution (1.4 ms per ViT-S/14 forward of
    256 crops, 4% of a compiled step), while the same product is one ordinary GEMM.
    """

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        n, channels, height, width = x.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"input size {height}x{width} px is not a multiple of the patch size {p}")
        rows, cols = height // p, width // p
        # [n, C, rows, p, cols, p] -> [n, rows, cols, C, p, p]: each patch flattened in the
        # (C, p, p) order of the kernel, patches in raster order as the convolution outputs them.
        patches = x.reshape(n, channels, rows, p, cols, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(n, rows * cols, channels * p * p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """``[n, T, 3 * D]`` with features laid out as ``(3, heads, head_dim)`` (DINOv2's order)
    -> q, k, v, each a view ``[n, heads, T, head_dim]`` of ``qkv``."""
    n, t, width = qkv.shape
    return qkv.reshape(n, t, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


class Attention(nn.Module):
    """Multi-head self-attention ``[n, T, D] -> [n, T, D]``.

    ``qkv`` output features are laid out as ``(3, heads, head_dim)``, DINOv2's order.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = split_qkv(self.qkv(x), self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """``fc1 -> GELU -> fc2`` with hidden width ``hidden_dim``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    """Hidden width of DINOv2's fused SwiGLU for a plain-MLP width: 2/3 of it, rounded down,
    then up to a multiple of 8 (6144 -> 4096 for ViT-g)."""
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: ``w3(silu(a) * b)`` with ``[a, b] = w12(x)``, each half ``hidden``."""

    def __init__(self, dim: int, mlp_hidden_dim: int) -> None:
        super().__init__()
        hidden = swiglu_hidden_dim(mlp_hidden_dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


# Read-only: "swiglufused" is DINOv2's config name for the same layer.
_FFN_LAYERS: Mapping[str, type[nn.Module]] = MappingProxyType(
    {"mlp": Mlp, "swiglu": SwiGLUFFN, "swiglufused": SwiGLUFFN}
)


class Block(nn.Module):
    """Pre-norm transformer block:
    ``x + drop(ls1(attn(norm1(x))))`` then ``x + drop(ls2(mlp(norm2(x))))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        ffn_layer: str,
        drop_path_rate: float,
        layerscale_init: float | None,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _FFN_LAYERS[ffn_layer](dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init is not None else nn.Identity()
        self.drop_path = DropPath(drop_path_rate)
        self.drop_path_mode = "sample"

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_path_mode == "subset" and self.training and self.drop_path.rate > 0:
            x = add_on_subset(x, lambda t: self.ls1(self.attn(self.norm1(t))), self.drop_path.rate)
            return add_on_subset(x, lambda t: self.ls2(self.mlp(self.norm2(t))), self.drop_path.rate)
        x = x + self.drop_path(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path(self.ls2(self.mlp(self.norm2(x))))


#: How a training block drops its residual branches (stochastic depth): ``sample`` (each
#: row's branch zeroed with probability ``rate``, kept ones scaled by ``1 / (1 - rate)``)
#: or ``subset`` (the branch computed on a random ``1 - rate`` share of the rows only, see
#: :func:`add_on_subset`; DINOv2 does this for rates above 0.1).
DROP_PATH_MODES = ("sample", "subset")

#: How the blocks' stochastic-depth rates follow ``drop_path_rate``: ``linear`` (0 at the
#: first block rising to the rate at the last, as timm and DINOv2's ``drop_path_uniform:
#: false``) or ``uniform`` (the rate in every block, DINOv2's default).
DROP_PATH_SCHEDULES = ("linear", "uniform")

#: dtypes of the residual stream between blocks: ``fp32`` (what type promotion gives with
#: float32 parameters, also under autocast) or ``autocast`` (the autocast dtype when autocast
#: is on, as with DINOv2's half-precision FSDP parameters; float32 otherwise).
RESIDUAL_STREAMS = ("fp32", "autocast")


def _one_of(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


class VisionTransformer(nn.Module):
    """ViT backbone with class token, optional register tokens and iBOT mask token.

    ``img_size`` (pixels) only fixes the stored position-embedding grid
    ``img_size // patch_size`` squared; other input sizes (multiples of ``patch_size``)
    interpolate it on the fly.

    ``residual_stream`` (one of :data:`RESIDUAL_STREAMS`, default ``fp32``) sets the dtype
    of the tokens between blocks. Under bf16 autocast with float32 parameters the stream
    is float32 (the float32 position embedding and LayerScale promote it), so every layer
    norm and residual add moves float32 activations; ``autocast`` keeps it in bf16, as
    DINOv2's FSDP mixed precision (half-precision parameters) does, at half the bytes.
    Layer norms still compute in float32 either way (autocast runs them in float32); with
    ``autocast`` the LayerScale products are taken in the branch's (autocast) dtype too.

    ``drop_path_mode`` (one of :data:`DROP_PATH_MODES`, default ``sample``) sets how the
    training blocks apply their stochastic-depth rates; ``drop_path_schedule`` (one of
    :data:`DROP_PATH_SCHEDULES`, default ``linear``) what those rates are.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_layer: str = "mlp",
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = 1e-5,
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
        residual_stream: str = "fp32",
        drop_path_mode: str = "sample",
        drop_path_schedule: str = "linear",
    ) -> None:
        super().__init__()
        if ffn_layer not in _FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; valid: {sorted(_FFN_LAYERS)}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")

        self.embed_dim = embed_dim
        self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.n_blocks = depth
        self.num_register_tokens = num_register_tokens
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Registers carry no position embedding, so pos_embed covers cls + patches only.
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))

        if _one_of("drop_path_schedule", drop_path_schedule, DROP_PATH_SCHEDULES) == "uniform":
            rates = [drop_path_rate] * depth
        else:
            rates = [drop_path_rate * i / (depth - 1) if depth > 1 else 0.0 for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, ffn_layer, rate, layerscale_init)
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.residual_stream = residual_stream
        self.drop_path_mode = drop_path_mode
        self.init_weights()

    @property
    def drop_path_mode(self) -> str:
        """One of :data:`DROP_PATH_MODES`; setting it sets every block's."""
        return self._drop_path_mode

    @drop_path_mode.setter
    def drop_path_mode(self, value: str) -> None:
        self._drop_path_mode = _one_of("drop_path_mode", value, DROP_PATH_MODES)
        for block in self.blocks:
            block.drop_path_mode = value

    @property
    def residual_stream(self) -> str:
        """One of :data:`RESIDUAL_STREAMS`; setting it also sets the LayerScales' dtype."""
        return self._residual_stream

    @residual_stream.setter
    def residual_stream(self, value: str) -> None:
        self._residual_stream = _one_of("residual_stream", value, RESIDUAL_STREAMS)
        for module in self.modules():
            if isinstance(module, LayerScale):
                module.in_input_dtype = value == "autocast"

    def init_weights(self) -> None:
        """DINOv2 init: trunc-normal(0.02) pos_embed and Linear weights, zero Linear biases,
        N(0, 1e-6) class/register tokens, zero mask token; Conv2d and LayerNorm keep the
        PyTorch defaults. Deterministic given ``torch.manual_seed``. Skipped on the meta
        device (shape-only models, e.g. before loading weights): there is nothing to fill."""
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def pos_embed_for_grid(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings ``[1, 1 + h*w, D]`` for a patch grid ``(h, w)``."""
        if tuple(grid) == self.grid_size:
            return self.pos_embed
        return interpolate_pos_embed(
            self.pos_embed, grid, self.interpolate_offset, self.interpolate_antialias
        )

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images ``[n, C, H, W]`` -> tokens ``[n, 1 + R + N, D]`` ordered cls, registers,
        patches. Patches where ``masks [n, N]`` is True become ``mask_token`` before the
        position embeddings are added."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.patch_embed(x)
        if masks is not None:
            if masks.dtype != torch.bool or tuple(masks.shape) != tuple(tokens.shape[:2]):
                raise ValueError(
                    f"masks must be bool of shape {tuple(tokens.shape[:2])}, "
                    f"got {masks.dtype} {tuple(masks.shape)}"
                )
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1) + self.pos_embed_for_grid(grid).to(tokens.dtype)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(tokens.shape[0], -1, -1)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)
        return tokens

    def forward(self, x: Tensor, masks: Tensor | None = None) -> dict[str, Any]:
        """``x [n, C, H, W]``, optional ``masks bool [n, N]`` -> dict with
        ``x_norm_clstoken [n, D]``, ``x_norm_regtokens [n, R, D]``,
        ``x_norm_patchtokens [n, N, D]``, ``x_prenorm [n, 1 + R + N, D]`` and ``masks``."""
        tokens = self.prepare_tokens(x, masks)
        device_type = tokens.device.type
        if self.residual_stream == "autocast" and torch.is_autocast_enabled(device_type):
            tokens = tokens.to(torch.get_autocast_dtype(device_type))
        use_checkpoint = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            # Non-reentrant checkpointing restores the RNG state, so drop path draws the
            # same samples in the recomputation.
            tokens = checkpoint(block, tokens, use_reentrant=False) if use_checkpoint else block(tokens)
        normed = self.norm(tokens)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": normed[:, 0],
            "x_norm_regtokens": normed[:, 1:first_patch],
            "x_norm_patchtokens": normed[:, first_patch:],
            "x_prenorm": tokens,
            "masks": masks,
        }


def vit_tiny(**kwargs: Any) -> VisionTransformer:
    """Small ViT for CPU demos and tests: D=192, 4 blocks, 3 heads."""
    return VisionTransformer(**{"embed_dim": 192, "depth": 4, "num_heads": 3, **kwargs})


def vit_small(**kwargs: Any) -> VisionTransformer:
    """ViT-S: D=384, 12 blocks, 6 heads (~22M parameters)."""
    return VisionTransformer(**{"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs})


def vit_base(**kwargs: Any) -> VisionTransformer:
    """ViT-B: D=768, 12 blocks, 12 heads (~86M parameters)."""
    return VisionTransformer(**{"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs})


def vit_large(**kwargs: Any) -> VisionTransformer:
    """ViT-L: D=1024, 24 blocks, 16 heads (~300M parameters)."""
    return VisionTransformer(**{"embed_dim": 1024, "depth": 24, "num_heads": 16, **kwargs})


def vit_giant2(**kwargs: Any) -> VisionTransformer:
    """DINOv2's ViT-g: D=1536, 40 blocks, 24 heads, SwiGLU FFN (~1.1B parameters)."""
    return VisionTransformer(
        **{"embed_dim": 1536, "depth": 40, "num_heads": 24, "ffn_layer": "swiglu", **kwargs}
    )


def _factories() -> dict[str, Callable[..., VisionTransformer]]:
    return {
        "vit_tiny": vit_tiny,
        "vit_small": vit_small,
        "vit_base": vit_base,
        "vit_large": vit_large,
        "vit_giant2": vit_giant2,
    }


def build_backbone(arch: str, **kwargs: Any) -> VisionTransformer:
    """Build a backbone by factory name (``vit_tiny`` ... ``vit_giant2``); ``kwargs``
    override the factory's defaults."""
    factories = _factories()
    if arch not in factories:
        raise ValueError(f"unknown backbone arch {arch!r}; valid: {', '.join(factories)}")
    return factories[arch](**kwargs)
