"""``python -m bench.attention [--tokens 256 257 264] [--variants NAME ...] [--packed] [--json FILE]``

Forward + backward time of one block's attention on the attention shapes of a ViT-S/14 and a
ViT-L/14 training step (two 224 px crops per image: 256 patch tokens + the CLS token = 257),
at several token counts, in bf16 on a GPU: ``F.scaled_dot_product_attention`` with its
default backend and with each backend forced, FlexAttention compiled (its Triton kernels
with their default tiles, with 64-row tiles, and autotuned), and ``lse_merge`` eager and
compiled (``bench/lse_merge.py``, the first token's key merged in apart; an experiment the
model does not use). It shows what the odd 257th token costs: attention kernels work on
tiles of 64-128 rows, and 257 tokens fill one more tile than 256.

``--packed`` times what the model runs: q, k and v are views of one ``[n, tokens, 3 x
heads x head_dim]`` tensor (the ``qkv`` linear's output), so the time includes reassembling
their gradients into that tensor's layout.

On a CPU it runs the same loop in fp32 on a small shape (``--small``), to check the script.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.lse_merge import lse_merge_attention
from bench.report import emit
from bench.timing import mean_seconds
from dinov2_hier.models.vision_transformer import split_qkv

# (rows of q = crops per step, heads, head size) of one block's attention
SHAPES = {"vit_small_b128": (256, 6, 64), "vit_large_b64": (128, 16, 64)}
SMALL_SHAPES = {"tiny": (2, 2, 16)}


def _sdpa_with(backend):
    """SDPA restricted to ``backend`` (None: PyTorch's choice)."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
            return F.scaled_dot_product_attention(q, k, v)

    return run


def _flex_with(kernel_options: dict | None):
    """FlexAttention without a mask or score modification (plain softmax attention, scale
    1/sqrt(head_dim)), with ``kernel_options`` (None: its defaults)."""
    from torch.nn.attention.flex_attention import flex_attention

    return lambda q, k, v: flex_attention(q, k, v, kernel_options=kernel_options)


# 64-row tiles everywhere: 257 tokens fill five such tiles (320 rows) instead of three of
# 128 (384 rows)
FLEX_TILES_64 = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64,
                 "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64}


def attention_variants(device: torch.device) -> dict:
    """Name -> ``fn(q, k, v)`` for each variant timed on ``device``: SDPA's default
    backend and (GPU) each backend forced, FlexAttention (GPU, compiled: it has no fast
    eager path), ``lse_merge`` with the class key apart, eager and (GPU) compiled with
    Inductor, which fuses the merge's elementwise work. Compiled variants are compiled
    whole, with the ``--packed`` split of the ``qkv`` tensor when that is timed."""
    from torch.nn.attention import SDPBackend

    variants = {"default": _sdpa_with(None)}
    if device.type == "cuda":
        variants["default compiled"] = _Compiled(_sdpa_with(None))
        variants["cudnn"] = _sdpa_with(SDPBackend.CUDNN_ATTENTION)
        variants["flash"] = _sdpa_with(SDPBackend.FLASH_ATTENTION)
        variants["efficient"] = _sdpa_with(SDPBackend.EFFICIENT_ATTENTION)
        variants["flex compiled"] = _Compiled(_flex_with(None))
        variants["flex compiled, 64-row tiles"] = _Compiled(_flex_with(FLEX_TILES_64))
        variants["flex autotuned"] = _Compiled(_flex_with(None), mode="max-autotune-no-cudagraphs")
    variants["lse_merge"] = lambda q, k, v: lse_merge_attention(q, k, v, 1)
    if device.type == "cuda":
        variants["lse_merge compiled"] = _Compiled(variants["lse_merge"])
    return variants


class _Compiled:
    """Marks ``fn`` to be compiled (with ``mode``) once the timed function around it is
    known (``--packed`` puts the ``qkv`` split inside the compiled region)."""

    def __init__(self, fn, mode: str | None = None) -> None:
        self.fn, self.mode = fn, mode

    def wrap(self, outer):
        # each variant and shape is timed once; a fresh cache keeps Dynamo from counting
        # them as recompiles of one function (the variants share code objects)
        torch._dynamo.reset()
        return torch.compile(outer, fullgraph=True, mode=self.mode, dynamic=False)


def timed_function(fn, packed: bool, heads: int):
    """The function of the timed tensors: ``fn(q, k, v)``, or with ``packed`` ``fn`` of the
    split of one ``qkv`` tensor (the model's ``split_qkv``); compiled whole when ``fn`` is
    marked ``_Compiled``."""
    inner = fn.fn if isinstance(fn, _Compiled) else fn
    outer = (lambda qkv: inner(*split_qkv(qkv, heads))) if packed else inner
    return fn.wrap(outer) if isinstance(fn, _Compiled) else outer


def time_attention(n: int, heads: int, tokens: int, head_dim: int, device: torch.device, fn, repeats: int,
                   packed: bool = False) -> float:
    """Mean seconds of one forward + backward of ``fn(q, k, v)`` on ``[n, heads, tokens,
    head_dim]`` (with ``packed``: of ``fn`` of the split of one ``[n, tokens, 3 x heads x
    head_dim]`` tensor, gradients reassembled into it), over ``repeats`` calls queued back
    to back (after 3 warm-up calls): the kernels' time, not the launch latency of a single
    call."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    run = timed_function(fn, packed, heads)
    if packed:
        inputs = (torch.randn(n, tokens, 3 * heads * head_dim, device=device, dtype=dtype, requires_grad=True),)
    else:
        inputs = tuple(torch.randn(n, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
    grad = torch.randn(n, heads, tokens, head_dim, device=device, dtype=dtype)
    return mean_seconds(lambda: run(*inputs).backward(grad), device, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[1])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 257, 264])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--variants", nargs="+", default=None, help="time only these variants (default: all)")
    parser.add_argument("--packed", action="store_true", help="q, k, v as views of one qkv tensor, as in the model")
    parser.add_argument("--small", action="store_true", help="a tiny shape (for a CPU check of the script)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    variants = attention_variants(device)
    if args.variants is not None:
        unknown = sorted(set(args.variants) - set(variants))
        if unknown:
            parser.error(f"unknown variants {unknown}; on this device: {sorted(variants)}")
        variants = {name: variants[name] for name in args.variants}
    rows = []
    for name, (n, heads, head_dim) in (SMALL_SHAPES if args.small else SHAPES).items():
        for tokens in args.tokens:
            for variant, fn in variants.items():
                seconds = time_attention(n, heads, tokens, head_dim, device, fn, args.repeats, args.packed)
                flops = 4 * n * heads * tokens * tokens * head_dim * 3  # QK^T and PV; backward counted as 2x forward
                rows.append({
                    "shape": name, "tokens": tokens, "backend": variant, "packed": args.packed, "ms": seconds * 1e3,
                    "tflops_per_s": flops / seconds / 1e12,
                })
    emit({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
          "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
