"""``python -m bench.attention [--tokens 256 257 264] [--json FILE]``

Forward + backward time of ``F.scaled_dot_product_attention`` on the attention shapes of a
ViT-S/14 and a ViT-L/14 training step (two 224 px crops per image: 256 patch tokens + the
CLS token = 257), at several token counts, in bf16 on a GPU: SDPA with its default and
with the FlashAttention backend, and ``lse_merge`` eager and compiled (``bench/lse_merge.py``,
the first token's key merged in apart; an experiment the model does not use). It shows
what the odd 257th token costs: attention kernels work on tiles of 64-128 rows, and 257
tokens fill one more tile than 256.

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


def attention_variants(device: torch.device) -> dict:
    """Name -> ``fn(q, k, v)`` for each variant timed on ``device``: SDPA's default
    backend, FlashAttention (GPU), ``lse_merge`` with the class key apart, eager and (GPU)
    compiled with Inductor, which fuses the merge's elementwise work."""
    from torch.nn.attention import SDPBackend

    variants = {"default": _sdpa_with(None)}
    if device.type == "cuda":
        variants["flash"] = _sdpa_with(SDPBackend.FLASH_ATTENTION)
    variants["lse_merge"] = lambda q, k, v: lse_merge_attention(q, k, v, 1)
    if device.type == "cuda":
        variants["lse_merge compiled"] = torch.compile(variants["lse_merge"], fullgraph=True)
    return variants


def time_attention(n: int, heads: int, tokens: int, head_dim: int, device: torch.device, fn, repeats: int) -> float:
    """Mean seconds of one forward + backward of ``fn(q, k, v)`` on ``[n, heads, tokens,
    head_dim]``, over ``repeats`` calls queued back to back (after 3 warm-up calls): the
    kernels' time, not the launch latency of a single call."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(n, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn_like(q)
    return mean_seconds(lambda: fn(q, k, v).backward(grad), device, repeats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attention", description=__doc__.split("\n\n")[1])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 257, 264])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="a tiny shape (for a CPU check of the script)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    variants = attention_variants(device)
    rows = []
    for name, (n, heads, head_dim) in (SMALL_SHAPES if args.small else SHAPES).items():
        for tokens in args.tokens:
            for variant, fn in variants.items():
                seconds = time_attention(n, heads, tokens, head_dim, device, fn, args.repeats)
                flops = 4 * n * heads * tokens * tokens * head_dim * 3  # QK^T and PV; backward counted as 2x forward
                rows.append({
                    "shape": name, "tokens": tokens, "backend": variant, "ms": seconds * 1e3,
                    "tflops_per_s": flops / seconds / 1e12,
                })
    emit({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
          "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
