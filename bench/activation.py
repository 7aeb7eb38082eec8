"""``python -m bench.activation [--repeats 20] [--json FILE]``

Time of the MLP activation of a ViT-S/14 and a ViT-L/14 training step (the ``[crops x 257
tokens, 4 x width]`` hidden layer, bf16 on a GPU), forward and backward, next to two
memory-bound references that move the same bytes: a negation (reads and writes each
element once, like the forward) and an addition of two tensors (reads two, writes one,
like the backward). An activation much slower than its reference is bound by arithmetic
(the exact GELU evaluates ``erf`` in float32), not by memory. Variants: exact and tanh
GELU, eager and (GPU) compiled with Inductor as the model's blocks are.

With ``--mlp`` it also times each activation inside the block it lives in, ``fc1 -> act
-> fc2`` of the ViT's width, forward and backward under bf16 autocast, compiled on a GPU:
there Inductor fuses the activation with its neighbours (the backward recomputes the
activation for ``fc2``'s weight gradient), so the isolated kernel's cost and the block's can
differ.

On a CPU it runs the same loop in fp32 on a small shape (``--small``), eager only, to check
the script.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench.report import emit
from bench.timing import mean_seconds

# (rows = crops per step x 257 tokens, hidden width = 4 x embedding width)
SHAPES = {"vit_small_b128": (256 * 257, 1536), "vit_large_b64": (128 * 257, 4096)}
SMALL_SHAPES = {"tiny": (10, 16)}


def activation_variants(device: torch.device, compiled: bool = True) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Name -> activation timed on ``device``: exact and tanh GELU, eager, and on a GPU
    (with ``compiled``) also compiled (Inductor fuses them into one kernel per direction)."""
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    }
    if device.type == "cuda" and compiled:
        for name in list(variants):
            variants[f"{name} compiled"] = torch.compile(variants[name], fullgraph=True)
    return variants


def time_activation(rows: int, width: int, device: torch.device, act, repeats: int) -> dict:
    """Forward and backward milliseconds of ``act`` on ``[rows, width]`` and the bytes per
    second they move: forward reads the input and writes the output, backward reads the
    input and the output's gradient and writes the input's gradient. The backward time is
    that of forward + backward minus the forward's."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(rows, width, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    with torch.no_grad():
        forward = mean_seconds(lambda: act(x), device, repeats)
    both = mean_seconds(lambda: torch.autograd.grad(act(x), x, grad), device, repeats)
    return _row(rows * width * x.element_size(), forward, both - forward)


def time_references(rows: int, width: int, device: torch.device, repeats: int) -> dict:
    """The same shapes through memory-bound kernels: ``neg`` as the forward (one read, one
    write per element) and ``add`` of two tensors as the backward (two reads, one write)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x, g = (torch.randn(rows, width, device=device, dtype=dtype) for _ in range(2))
    forward = mean_seconds(lambda: torch.neg(x), device, repeats)
    backward = mean_seconds(lambda: torch.add(x, g), device, repeats)
    return _row(rows * width * x.element_size(), forward, backward)


def time_mlp(rows: int, width: int, device: torch.device, act, repeats: int, compile: bool) -> dict:
    """Milliseconds of forward and of forward + backward of ``fc2(act(fc1(x)))`` on ``x
    [rows, width // 4]`` (``width`` = the hidden width), under bf16 autocast on a GPU."""
    dim = width // 4
    fc1, fc2 = torch.nn.Linear(dim, width).to(device), torch.nn.Linear(width, dim).to(device)
    params = [*fc1.parameters(), *fc2.parameters()]

    def block(x):
        return fc2(act(fc1(x)))

    block = torch.compile(block) if compile else block
    x = torch.randn(rows, dim, device=device, requires_grad=True)
    grad = torch.randn(rows, dim, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward():
        with torch.no_grad(), autocast:
            return block(x)

    def both():
        with autocast:
            out = block(x)
        return torch.autograd.grad(out, [x, *params], grad.to(out.dtype))

    return {"forward_ms": mean_seconds(forward, device, repeats) * 1e3,
            "forward_backward_ms": mean_seconds(both, device, repeats) * 1e3}


def _row(tensor_bytes: int, forward_s: float, backward_s: float) -> dict:
    return {
        "forward_ms": forward_s * 1e3, "backward_ms": backward_s * 1e3,
        "forward_gb_per_s": 2 * tensor_bytes / forward_s / 1e9,
        "backward_gb_per_s": 3 * tensor_bytes / backward_s / 1e9 if backward_s > 0 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.activation", description=__doc__.split("\n\n")[1])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--small", action="store_true", help="a tiny shape (for a CPU check of the script)")
    parser.add_argument("--mlp", action="store_true", help="also time each activation inside fc1 -> act -> fc2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for name, (n, width) in (SMALL_SHAPES if args.small else SHAPES).items():
        rows.append({"shape": name, "variant": "memory reference (neg / add)",
                     **time_references(n, width, device, args.repeats)})
        for variant, act in activation_variants(device).items():
            rows.append({"shape": name, "variant": variant, **time_activation(n, width, device, act, args.repeats)})
        if args.mlp:
            for variant, act in activation_variants(device, compiled=False).items():
                rows.append({"shape": name, "variant": f"{variant} in mlp" + (" compiled" if device.type == "cuda" else ""),
                             **time_mlp(n, width, device, act, args.repeats, compile=device.type == "cuda")})
    emit({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
          "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
