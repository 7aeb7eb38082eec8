"""Tests of the model floor: ViT backbone, DINO head, weight loading."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dinov2_hier.models import (
    DINOHead,
    VisionTransformer,
    WeightsError,
    build_backbone,
    interpolate_pos_embed,
    load_backbone_weights,
    read_state_dict,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)
from dinov2_hier.models.vision_transformer import DropPath, SwiGLUFFN
from dinov2_hier.models.weights import extract_backbone_state_dict

D, HEADS, DEPTH, R = 32, 2, 2, 3


def tiny(seed: int = 0, **kwargs) -> VisionTransformer:
    """D=32, 2 blocks, 2 heads, patch 7, 28 px (4x4 grid), 3 registers."""
    torch.manual_seed(seed)
    args = dict(img_size=28, patch_size=7, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_register_tokens=R)
    args.update(kwargs)
    model = VisionTransformer(**args)
    # Move LayerScale away from 1e-5 so that the blocks visibly change the tokens.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(0.5)
    return model


def images(n: int = 2, height: int = 28, width: int = 28, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def vit_param_count(dim: int, depth: int, ffn_params: int, n_patches: int, patch: int, registers: int = 0) -> int:
    """Parameters of a DINOv2 ViT from its layer shapes (3 input channels)."""
    tokens = dim + dim + (1 + n_patches) * dim + registers * dim  # cls, mask, pos_embed, registers
    patch_embed = 3 * patch * patch * dim + dim
    attention = (dim * 3 * dim + 3 * dim) + (dim * dim + dim)  # qkv, proj
    block = 2 * (2 * dim) + attention + 2 * dim + ffn_params  # 2 LayerNorms, LayerScales, FFN
    return tokens + patch_embed + depth * block + 2 * dim


# ----------------------------------------------------------------------------- backbone


def test_output_shapes_with_registers_and_non_square_input() -> None:
    model = tiny().eval()
    out = model(images(2, 14, 35))  # 2 x 5 patch grid, not the stored 4 x 4
    assert out["x_norm_clstoken"].shape == (2, D)
    assert out["x_norm_regtokens"].shape == (2, R, D)
    assert out["x_norm_patchtokens"].shape == (2, 10, D)
    assert out["x_prenorm"].shape == (2, 1 + R + 10, D)
    assert out["masks"] is None
    layer_norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(layer_norms) == 2 * DEPTH + 1 and all(m.eps == 1e-6 for m in layer_norms)
    # The normed outputs are LayerNorm(eps 1e-6) of x_prenorm, split cls | registers | patches.
    pre = out["x_prenorm"]
    mean = pre.mean(-1, keepdim=True)
    var = pre.var(-1, unbiased=False, keepdim=True)
    normed = (pre - mean) / torch.sqrt(var + 1e-6) * model.norm.weight + model.norm.bias
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_regtokens"], normed[:, 1 : 1 + R], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 1 + R :], atol=1e-5, rtol=1e-5)


def test_vit_small_parameter_count_matches_dinov2_vits14_at_518px() -> None:
    dim, hidden = 384, 4 * 384
    mlp_params = dim * hidden + hidden + hidden * dim + dim
    expected = vit_param_count(dim, 12, mlp_params, 37 * 37, 14)
    assert expected == 22_056_576
    with torch.device("meta"):
        model = vit_small(img_size=518)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.pos_embed.shape == (1, 1 + 37 * 37, 384)


def test_factories_shapes_and_giant2_swiglu_hidden() -> None:
    expected = {
        "vit_tiny": (vit_tiny, 192, 4, 3),
        "vit_small": (vit_small, 384, 12, 6),
        "vit_base": (vit_base, 768, 12, 12),
        "vit_large": (vit_large, 1024, 24, 16),
        "vit_giant2": (vit_giant2, 1536, 40, 24),
    }
    with torch.device("meta"):
        for arch, (factory, dim, depth, heads) in expected.items():
            for model in (factory(), build_backbone(arch)):
                assert (model.embed_dim, model.n_blocks, len(model.blocks), model.num_heads) == (dim, depth, depth, heads)
                assert model.blocks[0].attn.qkv.weight.shape == (3 * dim, dim)
        giant = vit_giant2(img_size=518)
        overridden = build_backbone("vit_small", num_register_tokens=4, patch_size=16, img_size=224)
    assert isinstance(giant.blocks[0].mlp, SwiGLUFFN)
    assert giant.blocks[0].mlp.w12.weight.shape == (2 * 4096, 1536)
    assert giant.blocks[0].mlp.w3.weight.shape == (1536, 4096)
    swiglu_params = 1536 * 2 * 4096 + 2 * 4096 + 4096 * 1536 + 1536
    count = sum(p.numel() for p in giant.parameters())
    assert count == vit_param_count(1536, 40, swiglu_params, 37 * 37, 14) == 1_136_480_768
    assert overridden.register_tokens.shape == (1, 4, 384)
    assert overridden.pos_embed.shape == (1, 1 + 14 * 14, 384)


def test_build_backbone_unknown_arch_names_it_and_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"vit_huge.*vit_tiny, vit_small, vit_base, vit_large, vit_giant2"):
        build_backbone("vit_huge")


def test_init_is_deterministic_and_follows_dinov2() -> None:
    torch.manual_seed(3)
    a = VisionTransformer(img_size=28, patch_size=7, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_register_tokens=R)
    torch.manual_seed(3)
    b = VisionTransformer(img_size=28, patch_size=7, embed_dim=D, depth=DEPTH, num_heads=HEADS, num_register_tokens=R)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(a.mask_token, torch.zeros(1, D))
    assert torch.equal(a.blocks[1].ls2.gamma, torch.full((D,), 1e-5))
    assert torch.equal(a.blocks[0].attn.qkv.bias, torch.zeros(3 * D))
    assert a.cls_token.abs().max() < 1e-5 and a.register_tokens.abs().max() < 1e-5
    assert 0.015 < a.blocks[0].mlp.fc1.weight.std() < 0.025  # trunc-normal std 0.02
    no_ls = VisionTransformer(img_size=28, patch_size=7, embed_dim=D, depth=1, num_heads=HEADS, layerscale_init=None)
    assert not any("gamma" in k for k in no_ls.state_dict())
    assert "register_tokens" not in no_ls.state_dict()


def test_attention_matches_hand_written_softmax_attention() -> None:
    model = tiny()
    attn = model.blocks[0].attn
    x = torch.randn(2, 5, D)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias  # features ordered (3, heads, head_dim)
    hd = D // HEADS
    heads_out = []
    for h in range(HEADS):
        q = qkv[..., h * hd : (h + 1) * hd]
        k = qkv[..., D + h * hd : D + (h + 1) * hd]
        v = qkv[..., 2 * D + h * hd : 2 * D + (h + 1) * hd]
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
        heads_out.append(weights @ v)
    expected = torch.cat(heads_out, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_swiglu_matches_hand_formula() -> None:
    ffn = SwiGLUFFN(8, 12)  # hidden: int(12 * 2 / 3) = 8, already a multiple of 8
    x = torch.randn(3, 8)
    h = x @ ffn.w12.weight.T + ffn.w12.bias
    a, b = h[:, :8], h[:, 8:]
    expected = (a / (1 + torch.exp(-a)) * b) @ ffn.w3.weight.T + ffn.w3.bias
    torch.testing.assert_close(ffn(x), expected, atol=1e-5, rtol=1e-5)
    assert SwiGLUFFN(4, 20).w3.in_features == 16  # int(13.33) = 13 -> 16


def test_prepare_tokens_masks_and_token_order() -> None:
    model = tiny()
    with torch.no_grad():
        model.mask_token.normal_()
    x = images(2)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [0, 5, 15]] = True
    masks[1, 7] = True
    tokens = model.prepare_tokens(x, masks)
    # Patch embedding by hand: 7x7 patches in row-major order times the conv kernel.
    patches = x.unfold(2, 7, 7).unfold(3, 7, 7)  # [n, C, 4, 4, 7, 7]
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 7 * 7)
    embed = patches @ model.patch_embed.proj.weight.reshape(D, -1).T + model.patch_embed.proj.bias
    expected = torch.where(masks[..., None], model.mask_token.expand(2, 16, D), embed) + model.pos_embed[:, 1:]
    torch.testing.assert_close(tokens[:, 1 + R :], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[0].expand(2, D))
    assert torch.equal(tokens[:, 1 : 1 + R], model.register_tokens.expand(2, R, D))  # no position embedding
    with pytest.raises(ValueError, match="masks must be bool"):
        model.prepare_tokens(x, masks.long())


def test_mask_token_equal_to_patch_embedding_leaves_output_unchanged() -> None:
    model = tiny().eval()
    tile = torch.randn(1, 3, 7, 7)
    x = tile.repeat(2, 1, 4, 4)  # every patch identical, so every patch embedding is too
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :6] = True
    masks[1, 9] = True
    with torch.no_grad():
        model.mask_token.copy_(model.patch_embed(x)[0, 0][None])
        plain = model(x)
        masked = model(x, masks)
        model.mask_token.zero_()
        zero_masked = model(x, masks)
    assert masked["masks"] is masks
    for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(masked[key], plain[key], atol=1e-6, rtol=1e-6)
    # A different mask token changes exactly the masked positions' input, hence the output.
    assert (zero_masked["x_norm_patchtokens"][0, :6] - plain["x_norm_patchtokens"][0, :6]).abs().max() > 1e-2


def test_interpolate_pos_embed_identity_shape_and_orientation() -> None:
    pos = torch.randn(1, 1 + 37 * 37, 8)
    same = interpolate_pos_embed(pos, (37, 37))
    assert torch.equal(same, pos)
    small = interpolate_pos_embed(pos, (16, 16))
    assert small.shape == (1, 1 + 16 * 16, 8)
    assert torch.equal(small[:, 0], pos[:, 0])
    # Bicubic weights sum to one: a constant field stays constant.
    const = torch.full((1, 1 + 16, 2), 3.0)
    torch.testing.assert_close(interpolate_pos_embed(const, (3, 7)), torch.full((1, 1 + 21, 2), 3.0))
    # A field varying along rows only must vary along the output's rows only.
    rows = torch.arange(4.0).repeat_interleave(4)  # value = row index of a 4x4 grid
    field = torch.cat([torch.zeros(1), rows]).reshape(1, 17, 1)
    out = interpolate_pos_embed(field, (2, 5))[0, 1:, 0].reshape(2, 5)
    torch.testing.assert_close(out, out[:, :1].expand(2, 5))
    assert out[1, 0] - out[0, 0] > 1.0
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.zeros(1, 1 + 12, 8), (2, 2))


def test_forward_at_other_resolution_uses_interpolated_pos_embed() -> None:
    model = tiny(img_size=56, patch_size=14)  # stored grid 4x4, like a 224 px model at 56 px / 4
    x = images(1, 28, 42)  # grid 2 x 3
    tokens = model.prepare_tokens(x)
    pos = interpolate_pos_embed(model.pos_embed, (2, 3))
    embed = model.patch_embed(x)
    torch.testing.assert_close(tokens[:, 1 + R :], embed + pos[:, 1:])
    assert model(images(1, 56, 56))["x_norm_patchtokens"].shape == (1, 16, D)
    with pytest.raises(ValueError, match="not a multiple of the patch size 14"):
        model(images(1, 30, 28))


def test_drop_path_sample_wise_and_rates_per_block() -> None:
    layer = DropPath(0.25).train()
    torch.manual_seed(0)
    out = layer(torch.ones(4000, 3, 2))
    per_sample = out.reshape(4000, -1)
    assert torch.equal(per_sample.min(1).values, per_sample.max(1).values)  # whole sample kept or dropped
    assert per_sample[:, 0].unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    dropped = (per_sample[:, 0] == 0).float().mean().item()
    assert abs(dropped - 0.25) < 0.03
    assert torch.equal(layer.eval()(torch.ones(5, 2)), torch.ones(5, 2))
    model = VisionTransformer(img_size=28, patch_size=7, embed_dim=D, depth=4, num_heads=HEADS, drop_path_rate=0.3)
    rates = [block.drop_path.rate for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_uniform_drop_path_schedule_gives_every_block_the_rate() -> None:
    def rates(**kwargs) -> list[float]:
        model = VisionTransformer(img_size=28, patch_size=7, embed_dim=D, depth=4, num_heads=HEADS, **kwargs)
        return [block.drop_path.rate for block in model.blocks]

    assert rates(drop_path_rate=0.3, drop_path_schedule="uniform") == [0.3, 0.3, 0.3, 0.3]
    assert rates(drop_path_rate=0.3, drop_path_schedule="linear") == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert rates(drop_path_rate=0.0, drop_path_schedule="uniform") == [0.0] * 4
    with pytest.raises(ValueError, match="drop_path_schedule must be one of linear, uniform, got 'cosine'"):
        rates(drop_path_rate=0.3, drop_path_schedule="cosine")


def test_drop_path_identity_in_eval_and_active_in_train() -> None:
    dropping = tiny(drop_path_rate=0.5)
    plain = tiny(drop_path_rate=0.0)
    plain.load_state_dict(dropping.state_dict())
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(dropping.eval()(x)["x_prenorm"], plain.eval()(x)["x_prenorm"], atol=0, rtol=0)
        torch.manual_seed(0)
        trained = dropping.train()(x)["x_prenorm"]
        reference = plain.train()(x)["x_prenorm"]
    assert (trained - reference).abs().max() > 1e-2


def test_gradient_checkpointing_same_output_and_gradients() -> None:
    model = tiny(drop_path_rate=0.3).train()
    x = images(3)

    def run(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.grad_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)  # same drop-path draws in both runs
        out = model(x)["x_prenorm"]
        (out**2).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    assert model.grad_checkpointing is False
    out_a, grads_a = run(False)
    out_b, grads_b = run(True)
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and "blocks.1.mlp.fc2.weight" in grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-5, msg=name)


def test_residual_stream_autocast_adds_each_branch_once_in_the_autocast_dtype() -> None:
    model = tiny().eval()
    x = images(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        wide = model(x)["x_prenorm"]
        model.residual_stream = "autocast"
        narrow = model(x)["x_prenorm"]
        # The same blocks written out: tokens cast once after the embeddings, each branch
        # scaled by its LayerScale in bf16 and added to the bf16 stream.
        t = model.prepare_tokens(x).to(torch.bfloat16)
        for blk in model.blocks:
            t = t + blk.attn(blk.norm1(t)) * blk.ls1.gamma.to(torch.bfloat16)
            t = t + blk.mlp(blk.norm2(t)) * blk.ls2.gamma.to(torch.bfloat16)
    assert wide.dtype == torch.float32 and narrow.dtype == torch.bfloat16
    assert torch.equal(narrow, t)
    # Against the float32 stream: the tokens reach |x| = 1.96 here, where one bf16 step is
    # 2**-6 = 0.0156; the rounded products and adds of two blocks stay within two steps.
    diff = (narrow.float() - wide).abs().max().item()
    assert wide.abs().max().item() < 2.0 and 0 < diff <= 2 * 2**-6


def test_residual_stream_changes_nothing_without_autocast() -> None:
    model = tiny().eval()
    x = images(2)
    with torch.no_grad():
        wide = model(x)
        model.residual_stream = "autocast"
        same = model(x)
    assert all(torch.equal(wide[k], same[k]) for k in ("x_prenorm", "x_norm_clstoken", "x_norm_patchtokens"))


def test_residual_stream_rejects_unknown_values_and_sets_every_layerscale() -> None:
    with pytest.raises(ValueError, match="residual_stream must be one of fp32, autocast, got 'fp16'"):
        tiny(residual_stream="fp16")
    model = tiny(residual_stream="autocast")
    scales = [m for m in model.modules() if type(m).__name__ == "LayerScale"]
    assert len(scales) == 2 * DEPTH and all(m.in_input_dtype for m in scales)
    model.residual_stream = "fp32"
    assert not any(m.in_input_dtype for m in scales)


def test_add_on_subset_runs_the_branch_on_the_kept_rows_and_scales_them() -> None:
    from dinov2_hier.models.vision_transformer import add_on_subset

    seen = []

    def branch(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape[0])
        return 3.0 * t

    x = torch.arange(1.0, 11.0).reshape(10, 1).requires_grad_(True)
    torch.manual_seed(0)
    out = add_on_subset(x, branch, rate=0.3)  # floor(10 * 0.7) = 7 rows, scale 10 / 7
    kept = (out != x).squeeze(1)
    assert seen == [7] and int(kept.sum()) == 7
    torch.testing.assert_close(out[kept], x[kept] * (1 + 3.0 * 10 / 7))
    assert torch.equal(out[~kept], x[~kept])
    out.sum().backward()
    torch.testing.assert_close(x.grad[kept], torch.full((7, 1), 1 + 3.0 * 10 / 7))
    assert torch.equal(x.grad[~kept], torch.ones(3, 1))
    # At least one row keeps the branch, scaled by n.
    assert int((add_on_subset(torch.zeros(4, 2), torch.ones_like, rate=0.99) == 4.0).all(dim=1).sum()) == 1


def test_add_on_subset_traces_to_gathers_without_scatters_or_atomics() -> None:
    """Forward: uniform draws, a sort and gathers; no randperm (an ATen call with host work
    every time) and no index_add (ATen's atomic kernel for bf16 on CUDA: 10 ms of a ViT-L
    step). Backward: gathers again, no zero tensor scattered into (index_put's backward)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    from dinov2_hier.models.vision_transformer import add_on_subset

    graphs: dict[str, list] = {"forward": [], "backward": []}

    def capture(which: str):
        def compiler(graph_module, example_inputs):
            graphs[which].append(graph_module)
            return make_boxed_func(graph_module.forward)

        return compiler

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=capture("forward"), bw_compiler=capture("backward"))
    fn = torch.compile(lambda t: add_on_subset(t, torch.tanh, rate=0.5), backend=backend, fullgraph=True)
    fn(torch.randn(8, 3, requires_grad=True)).sum().backward()
    called = {
        which: {n.target.__name__.split(".")[0] for n in found[0].graph.nodes if n.op == "call_function"}
        for which, found in graphs.items()
    }
    assert {"rand", "sort", "index"} <= called["forward"]
    assert "index" in called["backward"]
    banned = {"randperm", "index_add", "index_put", "scatter", "scatter_add", "slice_scatter", "slice_backward",
              "zeros", "new_zeros", "full"}
    assert not (called["forward"] | called["backward"]) & banned


def test_add_on_subset_has_the_expectation_of_the_full_branch() -> None:
    from dinov2_hier.models.vision_transformer import add_on_subset

    torch.manual_seed(0)
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    mean = torch.stack([add_on_subset(x, lambda t: 2.0 * t, rate=0.5) for _ in range(4000)]).mean(0)
    # E = x + P(kept) * (4 / 2) * 2x = x + 2x; 4000 draws of a 0/1 choice: about 1% spread.
    torch.testing.assert_close(mean, 3.0 * x, rtol=0.03, atol=0.0)


def _add_on_subset_index_put(x: torch.Tensor, branch, rate: float) -> torch.Tensor:
    """The batch subset written the direct way (the model's form before the row
    permutation): the same draw (one ``torch.rand(n)``, so the same rows under the same
    seed), a gather of the kept rows and an ``index_put`` of their updates."""
    n = x.shape[0]
    kept = max(int(n * (1.0 - rate)), 1)
    rows = torch.rand(n, device=x.device).argsort()[:kept]
    subset = x[rows]
    return x.index_put((rows,), subset + branch(subset).to(x.dtype) * (n / kept))


def test_add_on_subset_adds_the_same_update_as_the_index_put_form() -> None:
    from dinov2_hier.models.vision_transformer import add_on_subset

    # A constant branch: kept = floor(8 * 0.6) = 4 rows get + 8 / 4 = 2, the others nothing.
    x = torch.randn(8, 3, dtype=torch.float64)
    torch.manual_seed(3)
    out = add_on_subset(x, lambda t: torch.ones_like(t), 0.4)
    assert sorted((out - x)[:, 0].tolist()) == pytest.approx([0.0] * 4 + [2.0] * 4)
    # A learnable branch: same crops (same draw under the same seed), same values and gradients.
    branch = torch.nn.Linear(3, 3).double()
    results = []
    for fn in (_add_on_subset_index_put, add_on_subset):
        xg = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        y = fn(xg, lambda t: torch.tanh(branch(t)), 0.4)
        grads = torch.autograd.grad((y * torch.arange(24.0, dtype=torch.float64).view(8, 3)).sum(),
                                    [xg, *branch.parameters()])
        results.append((y, grads))
    (y_ref, g_ref), (y_new, g_new) = results
    torch.testing.assert_close(y_new, y_ref, rtol=0, atol=1e-12)
    for a, b in zip(g_new, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert not torch.equal(y_ref, x)  # the branch did change some rows


def test_subset_drop_path_skips_the_dropped_rows_flops() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(drop_path_rate=0.5).train()  # block rates 0 and 0.5
    x = images(4)
    tokens = model.prepare_tokens(x).detach()

    def flops(fn) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops()

    full = flops(lambda: model(x))
    model.drop_path_mode = "subset"
    assert [b.drop_path_mode for b in model.blocks] == ["subset", "subset"]
    subset = flops(lambda: model(x))
    last = model.blocks[1]
    branches = flops(lambda: (last.attn(last.norm1(tokens)), last.mlp(last.norm2(tokens))))
    # Block 1 (rate 0.5) runs both branches on floor(4 * 0.5) = 2 of the 4 crops; block 0
    # (rate 0) on all of them. Matmul and attention FLOPs are linear in the rows.
    assert branches > 0 and full - subset == branches // 2
    model.eval()
    assert flops(lambda: model(x)) == full  # no drop path in eval mode
    with pytest.raises(ValueError, match="drop_path_mode must be one of sample, subset, got 'batch'"):
        model.drop_path_mode = "batch"


def test_subset_drop_path_with_gradient_checkpointing_same_output_and_gradients() -> None:
    model = tiny(drop_path_rate=0.5, drop_path_mode="subset").train()
    x = images(4)

    def run(checkpointing: bool) -> tuple[torch.Tensor, torch.Tensor]:
        model.grad_checkpointing = checkpointing
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)  # the recomputation restores the RNG: same rows drawn
        out = model(x)["x_prenorm"]
        (out**2).sum().backward()
        return out.detach(), model.blocks[1].mlp.fc2.weight.grad.clone()

    out_a, grad_a = run(False)
    out_b, grad_b = run(True)
    torch.testing.assert_close(out_b, out_a, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_b, grad_a, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- weights


def _outputs(model: VisionTransformer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {k: v for k, v in model.eval()(x).items() if v is not None}


def _assert_same_outputs(a: VisionTransformer, b: VisionTransformer) -> None:
    x = images(2)
    out_a, out_b = _outputs(a, x), _outputs(b, x)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_load_plain_pth_round_trip(tmp_path: Path) -> None:
    source, target = tiny(seed=0), tiny(seed=1)
    path = tmp_path / "backbone.pth"
    torch.save(source.state_dict(), path)
    assert not torch.equal(source.blocks[0].attn.qkv.weight, target.blocks[0].attn.qkv.weight)
    report = load_backbone_weights(target, path)
    assert (report.missing, report.unexpected, report.interpolated) == ([], [], [])
    _assert_same_outputs(source, target)


def test_load_dinov2_teacher_layout_with_chunked_blocks(tmp_path: Path) -> None:
    source, target = tiny(seed=0, depth=4), tiny(seed=1, depth=4)
    teacher = {}
    for key, value in source.state_dict().items():
        if key.startswith("blocks."):
            index = int(key.split(".")[1])
            key = f"blocks.{index // 2}.{key.split('.', 1)[1]}"  # 2 chunks of 2 blocks
        teacher["backbone." + key] = value
    assert "backbone.blocks.1.3.norm1.weight" in teacher
    teacher["dino_head.last_layer.weight"] = torch.zeros(5, 4)
    teacher["ibot_head.mlp.0.weight"] = torch.zeros(5, 4)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher, "iteration": 12}, path)
    report = load_backbone_weights(target, path)
    assert (report.missing, report.unexpected) == ([], [])
    _assert_same_outputs(source, target)


def test_extract_prefers_teacher_and_strips_wrappers() -> None:
    s, t = torch.zeros(2), torch.ones(2)
    checkpoint = {
        "model": {
            "student.backbone.norm.weight": s,
            "teacher.backbone.norm.weight": t,
            "teacher.dino_head.mlp.0.bias": s,
        },
        "optimizer": {"state": {}},
    }
    assert extract_backbone_state_dict(checkpoint) == {"norm.weight": t}
    compiled = {"state_dict": {"module._orig_mod.backbone.blocks.0.0.ls1.gamma": t, "module.cls_token": s}}
    assert extract_backbone_state_dict(compiled) == {"blocks.0.ls1.gamma": t, "cls_token": s}
    with pytest.raises(WeightsError, match="'norm.bias' is a int"):
        extract_backbone_state_dict({"norm.weight": t, "norm.bias": 3})
    with pytest.raises(WeightsError, match="'norm.weight'"):
        extract_backbone_state_dict({"norm.weight": t, "backbone.norm.weight": s})


def test_load_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    source, target = tiny(seed=0), tiny(seed=1)
    path = tmp_path / "backbone.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    assert set(read_state_dict(path)) == set(source.state_dict())
    report = load_backbone_weights(target, path)
    assert (report.missing, report.unexpected) == ([], [])
    _assert_same_outputs(source, target)


def test_load_interpolates_pos_embed_to_model_grid() -> None:
    source = tiny(seed=0, img_size=56)  # 8 x 8 grid
    target = tiny(seed=1, img_size=28)  # 4 x 4 grid
    report = load_backbone_weights(target, source.state_dict())
    assert report.interpolated == ["pos_embed"]
    assert target.pos_embed.shape == (1, 17, D)
    assert torch.equal(target.pos_embed.data, interpolate_pos_embed(source.pos_embed.data, (4, 4)))
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_shape_mismatch_names_first_key_and_shapes() -> None:
    source = tiny(mlp_ratio=2.0)
    target = tiny(mlp_ratio=4.0)
    with pytest.raises(WeightsError, match=r"'blocks\.0\.mlp\.fc1\.weight'.*\(64, 32\).*\(128, 32\)"):
        load_backbone_weights(target, source.state_dict())


def test_missing_and_unexpected_keys_reported() -> None:
    source, target = tiny(seed=0), tiny(seed=1)
    state = dict(source.state_dict())
    del state["norm.weight"]
    del state["register_tokens"]
    state["extra.weight"] = torch.zeros(3)
    norm_before = target.norm.weight.clone()
    report = load_backbone_weights(target, state)
    assert sorted(report.missing) == ["norm.weight", "register_tokens"]
    assert report.unexpected == ["extra.weight"]
    assert torch.equal(target.norm.weight, norm_before)
    assert torch.equal(target.norm.bias, source.norm.bias)


class _NotATensor:
    pass


def test_read_state_dict_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pth"
    with pytest.raises(WeightsError, match="absent.pth"):
        read_state_dict(missing)
    pickled = tmp_path / "pickled.pth"
    torch.save({"obj": _NotATensor()}, pickled)
    with pytest.raises(WeightsError, match="pickled.pth"):
        read_state_dict(pickled)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(WeightsError, match="garbage.safetensors"):
        read_state_dict(garbage)
    bare = tmp_path / "bare.pt"
    torch.save(torch.zeros(3), bare)
    with pytest.raises(WeightsError, match="bare.pt holds a Tensor"):
        read_state_dict(bare)
    assert issubclass(WeightsError, ValueError)


# ----------------------------------------------------------------------------- head


def test_dino_head_structure_and_last_layer_prefix() -> None:
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 24), (24, 24), (24, 8)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert all(torch.equal(m.bias, torch.zeros(m.out_features)) for m in linears)
    # DINO / DINOv2's weight-norm names and shapes, so released heads load as they are
    names = {n: tuple(p.shape) for n, p in head.named_parameters() if n.startswith("last_layer.")}
    assert names == {"last_layer.weight_v": (10, 8), "last_layer.weight_g": (10, 1)}
    assert torch.equal(head.last_layer.weight_g, torch.ones(10, 1)) and head.last_layer.weight_g.requires_grad
    # nn.Linear's default init for the prototypes, as upstream: |v| <= 1 / sqrt(in)
    assert head.last_layer.weight_v.abs().max() <= 1 / math.sqrt(8)
    frozen = DINOHead(in_dim=16, out_dim=10, bottleneck_dim=8, norm_last_layer=True)
    assert not frozen.last_layer.weight_g.requires_grad
    single = DINOHead(in_dim=16, out_dim=10, bottleneck_dim=8, nlayers=1)
    assert [type(m) for m in single.mlp] == [torch.nn.Linear] and single.mlp[0].in_features == 16


def test_dino_head_normalises_bottleneck_and_prototypes() -> None:
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    x = torch.randn(5, 16)
    out = head(x)
    z = head.mlp(x)
    z_hat = z / z.pow(2).sum(-1, keepdim=True).sqrt()
    v = head.last_layer.weight_v
    v_hat = v / v.pow(2).sum(1, keepdim=True).sqrt()
    torch.testing.assert_close(out, z_hat @ v_hat.T, atol=1e-6, rtol=1e-5)
    assert out.abs().max() <= 1.0 + 1e-6
    torch.testing.assert_close(head.bottleneck(x), z)
    # Rescaling prototype directions does not change the output ...
    with torch.no_grad():
        head.last_layer.weight_v.mul_(torch.arange(1.0, 11.0)[:, None])
    torch.testing.assert_close(head(x), out, atol=1e-6, rtol=1e-5)
    # ... the gains scale each prototype's logit: g_k * cos(z, v_k)
    gains = torch.arange(1.0, 11.0)[:, None] / 4
    with torch.no_grad():
        head.last_layer.weight_g.copy_(gains)
    torch.testing.assert_close(head(x), out * gains.T, atol=1e-6, rtol=1e-5)
    # Patch-token input [n, t, in_dim] gives [n, t, out_dim].
    assert head(torch.randn(2, 3, 16)).shape == (2, 3, 10)
    # With identity prototypes the output is the normalised bottleneck: unit norm rows.
    square = DINOHead(in_dim=16, out_dim=8, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        square.last_layer.weight_v.copy_(3 * torch.eye(8))
    torch.testing.assert_close(square(x).norm(dim=-1), torch.ones(5))


def test_dino_head_loads_a_state_dict_with_a_plain_last_layer_weight() -> None:
    """Checkpoints written before the trainable gain hold ``last_layer.weight``: it loads
    as the prototype directions with gain 1, which computes the same function."""
    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=10, hidden_dim=24, bottleneck_dim=8)
    legacy = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer.")}
    legacy["last_layer.weight"] = torch.randn(10, 8) * 5
    head.load_state_dict(legacy)
    torch.testing.assert_close(head.last_layer.weight_v, legacy["last_layer.weight"])
    assert torch.equal(head.last_layer.weight_g, torch.ones(10, 1))
    x = torch.randn(3, 16)
    expected = F.normalize(head.mlp(x), dim=-1) @ F.normalize(legacy["last_layer.weight"], dim=1).T
    torch.testing.assert_close(head(x), expected, atol=1e-6, rtol=1e-5)


def test_patch_embed_equals_the_strided_convolution_it_replaces() -> None:
    """PatchEmbed runs a GEMM on flattened patches; it must equal Conv2d(stride=kernel),
    values and weight gradients, also for a non-square input."""
    from dinov2_hier.models.vision_transformer import PatchEmbed

    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=7, in_chans=3, embed_dim=5).double()
    x = torch.randn(2, 3, 14, 21, dtype=torch.float64)
    tokens = embed(x)
    reference = F.conv2d(x, embed.proj.weight, embed.proj.bias, stride=7).flatten(2).transpose(1, 2)
    assert tokens.shape == (2, 6, 5)
    torch.testing.assert_close(tokens, reference, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(tokens)
    (weight_grad,) = torch.autograd.grad((tokens * grad).sum(), embed.proj.weight)
    (reference_grad,) = torch.autograd.grad((reference * grad).sum(), embed.proj.weight)
    torch.testing.assert_close(weight_grad, reference_grad, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        embed(torch.zeros(1, 3, 14, 20, dtype=torch.float64))
