"""An experiment, measured and not adopted: attention with the class key merged in apart.

A ViT at 224 px with patch 14 attends over ``1 + 256`` tokens. Fused attention kernels
tile the keys in blocks of 64 or 128, so the one class-token key costs a whole extra
block: on an H200, one ViT-L attention call (128 crops, forward + backward) takes 0.99 ms
at 257 tokens and 0.69 ms at 256 (``docs/perf/attention_lse_merge.json``).

:func:`lse_merge_attention` runs the fused kernel over the patch keys only and adds the
``S`` leading keys exactly, through the log-sum-exp the kernel returns::

    L = logaddexp(L_patch, logsumexp_j s_j)        s_j = q . k_j * scale, j < S
    O = exp(L_patch - L) * O_patch + sum_j exp(s_j - L) * v_j

Backward is the fused kernel's backward, called with the *merged* output ``O`` and
log-sum-exp ``L``: it then recomputes the full-softmax probabilities of the patch keys
and the row term ``rowsum(dO * O)`` of the whole attention, so its ``dq, dk, dv`` are the
patch keys' exact share of the full gradient; the ``S`` leading keys add theirs in float32.
PyTorch's ring attention (context parallel) merges partial attentions the same way.

Why it is not in the model (``docs/performance.md``, fifth pass): compiled, the merge's
elementwise work (reading ``q``, ``O_patch``, ``dO``, ``O``, ``dq``; concatenating ``dk``
and ``dv``) cost more than the saved key tile: ViT-L 1.08 ms against SDPA's 0.99, ViT-S
1.24 against 0.76 (``docs/perf/attention_lse_merge.json``). Inside the compiled ViT the
cuDNN backward also refused the log-sum-exp's layout (unit stride on its size-1 dim).
``python -m bench.attention`` times it as the ``lse_merge`` variants.

The fused kernels with a log-sum-exp are ATen operators without a public Python API
(``torch.ops.aten._scaled_dot_product_cudnn_attention`` on CUDA,
``..._flash_attention_for_cpu`` on CPU); :data:`LSE_KERNELS` lists them by device type.

Shapes: ``n`` sequences, ``h`` heads, ``T`` query tokens (= keys), ``d`` head width,
``S`` leading keys merged apart, ``P = T - S`` patch keys.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import Tensor

LseForward = Callable[[Tensor, Tensor, Tensor, float], "tuple[Tensor, Tensor]"]
LseBackward = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float], "tuple[Tensor, Tensor, Tensor]"]


def _cudnn_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    out, lse, *_ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, False, False, scale=scale
    )
    return out, lse


def _cudnn_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    # No dropout and no variable lengths: the RNG state and sequence offsets are unused.
    no_rng = torch.empty((), dtype=torch.int64, device=q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, no_rng, no_rng, None, None, None,
        q.shape[2], k.shape[2], 0.0, False, scale=scale,
    )
    return dq, dk, dv


def _cpu_forward(q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)


def _cpu_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, False, scale=scale
    )


#: Fused attention kernels that return their log-sum-exp, by device type: ``(forward,
#: backward)``. ``forward(q, k, v, scale) -> (out, lse)`` with ``lse`` float32 holding
#: ``n*h*T`` values in the kernel's own shape; ``backward(dout, q, k, v, out, lse, scale)
#: -> (dq, dk, dv)`` takes ``lse`` in that shape.
LSE_KERNELS: Mapping[str, tuple[LseForward, LseBackward]] = MappingProxyType(
    {"cuda": (_cudnn_forward, _cudnn_backward), "cpu": (_cpu_forward, _cpu_backward)}
)


def _wide(x: Tensor) -> Tensor:
    """``x`` in the merge's dtype: float32, or float64 for float64 inputs."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _leading_scores(q: Tensor, k_lead: Tensor, scale: float) -> Tensor:
    """``q [n, h, T, d]``, ``k_lead [n, h, S, d]`` -> scores ``[n, h, T, S]`` (float32 or
    wider). A broadcast product and sum rather than a matmul: ``S`` is 1 or a few, and
    autocast leaves elementwise ops in float32."""
    return (_wide(q).unsqueeze(3) * _wide(k_lead).unsqueeze(2)).sum(-1) * scale


class _LseMergeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, n_lead: int, scale: float) -> Tensor:  # type: ignore[override]
        fused_forward, _ = _kernels_for(q.device.type)
        k_lead, k_rest = k[:, :, :n_lead], k[:, :, n_lead:]
        v_lead, v_rest = v[:, :, :n_lead], v[:, :, n_lead:]
        out_rest, lse_kernel = fused_forward(q, k_rest, v_rest, scale)
        lse_rest = lse_kernel.reshape(q.shape[:3])
        scores = _leading_scores(q, k_lead, scale)  # [n, h, T, S]
        lse = torch.logaddexp(lse_rest, scores.logsumexp(-1))
        probs = torch.exp(scores - lse.unsqueeze(-1))  # leading keys' share of the softmax
        out = _wide(out_rest) * torch.exp(lse_rest - lse).unsqueeze(-1)
        out = (out + (probs.unsqueeze(-1) * _wide(v_lead).unsqueeze(2)).sum(3)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.n_lead, ctx.scale, ctx.lse_shape = n_lead, scale, tuple(lse_kernel.shape)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors  # lse [n, h, T]
        n_lead, scale = ctx.n_lead, ctx.scale
        _, fused_backward = _kernels_for(q.device.type)
        k_lead, v_lead = k[:, :, :n_lead], v[:, :, :n_lead]
        # The kernel's own lse layout, strides included: cuDNN wants a unit last stride even
        # on its size-1 dim, which a view under torch.compile need not have.
        lse_kernel = lse.new_empty(ctx.lse_shape)
        lse_kernel.copy_(lse.reshape(ctx.lse_shape))
        # With the merged out and lse the kernel's dq, dk, dv are the patch keys' exact
        # share of the full attention's gradient (see the module docstring).
        dq, dk_rest, dv_rest = fused_backward(
            dout, q, k[:, :, n_lead:], v[:, :, n_lead:], out, lse_kernel, scale
        )
        dout_w = _wide(dout)
        probs = torch.exp(_leading_scores(q, k_lead, scale) - lse.unsqueeze(-1))
        row_term = (dout_w * _wide(out)).sum(-1, keepdim=True)  # rowsum(dO * O)  [n, h, T, 1]
        dprobs = (dout_w.unsqueeze(3) * _wide(v_lead).unsqueeze(2)).sum(-1)  # [n, h, T, S]
        dscores = probs * (dprobs - row_term) * scale
        dq = _wide(dq) + (dscores.unsqueeze(-1) * _wide(k_lead).unsqueeze(2)).sum(3)
        dk_lead = (dscores.unsqueeze(-1) * _wide(q).unsqueeze(3)).sum(2)  # [n, h, S, d]
        dv_lead = (probs.unsqueeze(-1) * dout_w.unsqueeze(3)).sum(2)
        dk = torch.cat((dk_lead.to(dk_rest.dtype), dk_rest), dim=2)
        dv = torch.cat((dv_lead.to(dv_rest.dtype), dv_rest), dim=2)
        return dq.to(q.dtype), dk, dv, None, None


def _kernels_for(device_type: str) -> tuple[LseForward, LseBackward]:
    if device_type not in LSE_KERNELS:
        raise RuntimeError(
            f"attention 'lse_merge' has no fused kernel for device {device_type!r} "
            f"(have: {', '.join(LSE_KERNELS)})"
        )
    return LSE_KERNELS[device_type]


def lse_merge_attention(q: Tensor, k: Tensor, v: Tensor, n_lead: int) -> Tensor:
    """Softmax attention ``[n, h, T, d] x3 -> [n, h, T, d]`` (scale ``d**-0.5``, no mask),
    equal to ``F.scaled_dot_product_attention(q, k, v)`` up to rounding, with the first
    ``n_lead`` keys (``1 <= n_lead < T``) merged in apart from the fused kernel's call on
    the others. Float32 for the merge; output in ``q``'s dtype."""
    if not 1 <= n_lead < k.shape[2]:
        raise ValueError(f"n_lead must be in [1, {k.shape[2]}), got {n_lead}")
    return _LseMergeAttention.apply(q, k, v, n_lead, q.shape[-1] ** -0.5)
