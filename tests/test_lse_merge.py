"""bench/lse_merge.py (an attention experiment timed by bench.attention): the fused kernel
over the patch keys with the leading keys merged in through its log-sum-exp equals plain
softmax attention, values and gradients."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.lse_merge import LSE_KERNELS, lse_merge_attention


def test_two_tokens_by_hand() -> None:
    """d = 1 (scale 1), one query row per case. Row 0: scores (ln 3, 0) -> softmax
    (3/4, 1/4), out 3/4*4 + 1/4*8 = 5. Row 1: scores (0, 0) -> (1/2, 1/2), out 6.
    With dO = 1: dv = column sums of the softmax (5/4, 3/4); ds_ij = p_ij (v_j - out_i):
    row 0 (-3/4, 3/4), row 1 (-1, 1); dq_i = sum_j ds_ij k_j; dk_j = sum_i ds_ij q_i."""
    q = torch.tensor([[1.0], [0.0]], dtype=torch.float64).view(1, 1, 2, 1).requires_grad_()
    k = torch.tensor([[math.log(3.0)], [0.0]], dtype=torch.float64).view(1, 1, 2, 1).requires_grad_()
    v = torch.tensor([[4.0], [8.0]], dtype=torch.float64).view(1, 1, 2, 1).requires_grad_()
    out = lse_merge_attention(q, k, v, n_lead=1)
    out.sum().backward()
    ln3 = math.log(3.0)
    torch.testing.assert_close(out.flatten(), torch.tensor([5.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(v.grad.flatten(), torch.tensor([1.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(q.grad.flatten(), torch.tensor([-0.75 * ln3, -ln3], dtype=torch.float64))
    torch.testing.assert_close(k.grad.flatten(), torch.tensor([-0.75, 0.75], dtype=torch.float64))


def _qkv(dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    # [n=2, h=3, T=11, d=8]; keys scaled up so that the softmax is far from uniform.
    q, k, v, dout = (torch.randn(2, 3, 11, 8, generator=g, dtype=torch.float64) for _ in range(4))
    return q, 2 * k, v, dout


def _value_and_grads(fn, q, k, v, dout, dtype):
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(dtype))
    return [t.double() for t in (out, *grads)]


@pytest.mark.parametrize("n_lead", [1, 3])
def test_equals_softmax_attention_in_float64(n_lead: int) -> None:
    q, k, v, dout = _qkv(torch.float64)
    merged = _value_and_grads(lambda *a: lse_merge_attention(*a, n_lead), q, k, v, dout, torch.float64)
    plain = _value_and_grads(F.scaled_dot_product_attention, q, k, v, dout, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), merged, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=name)


def test_bfloat16_error_is_that_of_plain_attention() -> None:
    """Against a float64 reference, bf16 lse_merge is within 1.5x of bf16 SDPA's own error
    (each about one bf16 step of these O(1) values, 2**-7) for the output and every grad."""
    q, k, v, dout = _qkv(torch.float64, seed=1)
    exact = _value_and_grads(F.scaled_dot_product_attention, q, k, v, dout, torch.float64)
    merged = _value_and_grads(lambda *a: lse_merge_attention(*a, 1), q, k, v, dout, torch.bfloat16)
    plain = _value_and_grads(F.scaled_dot_product_attention, q, k, v, dout, torch.bfloat16)
    for name, ref, a, b in zip(("out", "dq", "dk", "dv"), exact, merged, plain):
        err_merged, err_plain = (a - ref).abs().max().item(), (b - ref).abs().max().item()
        assert err_merged <= 1.5 * err_plain and err_merged < 0.05, (name, err_merged, err_plain)
        assert a.dtype == torch.float64  # converted by the helper; the op returned bf16


def test_output_dtype_follows_the_inputs_under_autocast() -> None:
    q, k, v, _ = _qkv(torch.float64)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lse_merge_attention(q, k, v, 1).dtype == torch.bfloat16


def test_compiled_forward_and_backward_match_eager() -> None:
    """AOTAutograd traces the custom backward (what torch.compile does on the GPU)."""
    q, k, v, dout = _qkv(torch.float32)
    eager = _value_and_grads(lambda *a: lse_merge_attention(*a, 1), q, k, v, dout, torch.float32)
    torch._dynamo.reset()
    compiled_fn = torch.compile(lambda *a: lse_merge_attention(*a, 1), backend="aot_eager", fullgraph=True)
    compiled = _value_and_grads(compiled_fn, q, k, v, dout, torch.float32)
    for name, a, b in zip(("out", "dq", "dk", "dv"), compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_bad_settings_are_named() -> None:
    q = torch.zeros(1, 1, 4, 8)
    with pytest.raises(ValueError, match=r"n_lead must be in \[1, 4\), got 4"):
        lse_merge_attention(q, q, q, 4)
    assert set(LSE_KERNELS) == {"cuda", "cpu"}
    meta = torch.zeros(1, 1, 4, 8, device="meta")
    with pytest.raises(RuntimeError, match="attention 'lse_merge' has no fused kernel for device 'meta'"):
        lse_merge_attention(meta, meta, meta, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (cuDNN attention)")
def test_cudnn_kernel_matches_sdpa_in_bf16() -> None:
    """The CUDA path at a ViT-S shape (1 + 256 tokens): lse_merge against SDPA, both bf16,
    each against a float32 reference on the GPU (measured on an H200: at most 1.6x SDPA's
    error, on the output)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, dout = (torch.randn(4, 6, 257, 64, device="cuda", generator=g) for _ in range(4))
    exact = _value_and_grads(F.scaled_dot_product_attention, q, k, v, dout, torch.float32)
    merged = _value_and_grads(lambda *a: lse_merge_attention(*a, 1), q, k, v, dout, torch.bfloat16)
    plain = _value_and_grads(F.scaled_dot_product_attention, q, k, v, dout, torch.bfloat16)
    for name, ref, a, b in zip(("out", "dq", "dk", "dv"), exact, merged, plain):
        err_merged, err_plain = (a - ref).abs().max().item(), (b - ref).abs().max().item()
        assert err_merged <= 2.0 * err_plain + 1e-3, (name, err_merged, err_plain)
