from __future__ import annotations

import json
import math

import pytest
import torch

from bench.train_step import main as bench_main


def test_train_step_benchmark_reports_all_fields(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "bench.json"
    overrides = tiny_overrides + [
        "supervision.hierarchy=hierarchies/synthetic.json", "supervision.losses=[{name: hierce}]",
        "compute.residual_stream=autocast", "student.drop_path_mode=subset",
    ]
    assert bench_main(["--steps", "2", "--warmup", "1", "--json", str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("measured: ")
    result = json.loads(out.read_text())
    assert result["batch_size"] == 8 and result["crop"] == 32 and result["supervised"] == ["hierce"]
    assert result["images_per_s"] == pytest.approx(8 * 2 / result["seconds"], rel=1e-12) and result["steps"] == 2
    assert result["host_syncs_per_step"] is None  # counted on a GPU only
    assert result["residual_stream"] == "autocast" and result["dtype"] == "fp32"  # CPU: no autocast, fp32 stream
    assert result["drop_path_mode"] == "subset"
    assert result["step_s_min"] <= result["step_s_median"] <= result["step_s_max"]


def test_loader_benchmark_counts_images(tiny_overrides, capsys):
    from bench.loader import main as loader_main

    assert loader_main(["--workers", "0", "--batches", "3", "--warmup", "1", *tiny_overrides]) == 0
    result = json.loads(capsys.readouterr().out.split("measured: ", 1)[1])
    assert result["images"] == 3 * 8 and result["batch_size"] == 8 and result["crop"] == 32
    assert result["images_per_s"] == result["images"] / result["seconds"]


def test_benchmarks_with_device_photometric(tmp_path, tiny_overrides, capsys):
    import torch

    from bench.loader import main as loader_main
    from bench.train_step import synthetic_batch
    from dinov2_hier.config import load_config

    overrides = tiny_overrides + ["crops.photometric=device"]
    batch = synthetic_batch(load_config(None, overrides), torch.device("cpu"))
    assert batch["global_crops"].dtype == torch.uint8 and batch["global_crops"].shape == (16, 3, 32, 32)
    assert batch["photometric"]["factors"].shape == (16, 4)  # the timed step applies them
    out = tmp_path / "bench.json"
    assert bench_main(["--steps", "1", "--warmup", "1", "--json", str(out), *overrides]) == 0
    assert json.loads(out.read_text())["photometric"] == "device"
    capsys.readouterr()
    assert loader_main(["--workers", "0", "--batches", "2", "--warmup", "1", *overrides]) == 0
    result = json.loads(capsys.readouterr().out.split("measured: ", 1)[1])
    assert result["photometric"] == "device" and result["images"] == 2 * 8


def test_probe_benchmark_reports_both_backends(tmp_path, capsys, monkeypatch):
    from bench.probe import main as probe_main

    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "1")  # torch: one thread for the session (conftest)
    out = tmp_path / "probe.json"
    assert probe_main(["--n", "300", "--dim", "16", "--classes", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for key in ("knn_k1", "knn_k20", "logreg_sklearn", "logreg_torch"):
        assert result[key]["fit_s"] >= 0 and 0.0 <= result[key]["balanced_accuracy"] <= 1.0
    assert result["logreg_speedup_torch_vs_sklearn"] == result["logreg_sklearn"]["fit_s"] / result["logreg_torch"]["fit_s"]
    # the planted blobs are easy: both backends well above chance (1/3) and within 5 points
    assert result["logreg_sklearn"]["balanced_accuracy"] > 0.6
    assert abs(result["logreg_accuracy_gap_points"]) < 5


def test_flop_counter_counts_forward_and_backward_of_a_linear_layer():
    import torch

    from bench.train_step import count_step_flops

    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4, requires_grad=True)

    def step():
        layer(x).sum().backward()

    # forward 2*B*in*out = 48; backward: grad wrt input 48 + grad wrt weight 48
    assert count_step_flops(step) == 144


def test_mfu_fields_are_consistent(tmp_path, tiny_overrides):
    out = tmp_path / "bench.json"
    assert bench_main(["--steps", "2", "--warmup", "1", "--peak-tflops", "2.0", "--json", str(out), *tiny_overrides]) == 0
    r = json.loads(out.read_text())
    assert r["flops_per_step"] > 0 and r["peak_tflops"] == 2.0 and r["peak_source"] == "given"
    per_s = r["steps"] / r["seconds"]
    assert r["tflops_per_s"] == pytest.approx(r["flops_per_step"] * per_s / 1e12, rel=1e-12)
    assert r["mfu"] == pytest.approx(r["flops_per_step"] * per_s / 2.0e12, rel=1e-12)


@pytest.mark.parametrize("name, peak, source", [
    ("NVIDIA H100 80GB HBM3", 989.0, "H100 dense bf16"),
    ("NVIDIA H100 PCIe", 756.0, "H100 PCIe dense bf16"),
    ("NVIDIA H100 NVL", 835.0, "H100 NVL dense bf16"),
    ("NVIDIA H200", 989.0, "H200 dense bf16"),
    ("NVIDIA H200 NVL", 835.0, "H200 NVL dense bf16"),
])
def test_peak_by_device_name(monkeypatch, name, peak, source):
    from bench.train_step import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda"), None) == (peak, source)


def test_unknown_device_has_no_peak_and_says_so(monkeypatch):
    from bench.train_step import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    value, source = peak_tflops(torch.device("cuda"), None)
    assert math.isnan(value) and source == "unknown device NVIDIA A100-SXM4-80GB: pass --peak-tflops"
    assert peak_tflops(torch.device("cuda"), 312.0) == (312.0, "given")


def test_report_renders_measured_json_into_the_doc(tmp_path):
    from bench.report import BEGIN, END, update_doc

    results = tmp_path / "perf"
    results.mkdir()
    step = {
        "arch": "vit_large", "supervised": ["hierce"], "device": "NVIDIA H200", "torch": "2.11", "dtype": "bf16",
        "batch_size": 64, "crop": 224, "world_size": 2, "parallel": "ddp", "images_per_s": 408.27,
        "step_s_median": 0.3130, "peak_mem_gib": 41.77, "peak_mem_gib_per_rank": [41.77, 41.5], "mfu": 0.2755,
        "compile": False, "speedup_vs_eager_fp32": 1.9235, "eager_fp32": {"images_per_s": 109.71},
    }
    (results / "l.json").write_text(json.dumps(step))
    (results / "m.json").write_text(json.dumps(
        {**step, "steps": 15, "seconds": 2.35, "photometric": "device", "residual_stream": "autocast"}))
    (results / "n.json").write_text(json.dumps(
        {**step, "steps": 15, "seconds": 2.35, "drop_path_mode": "subset"}))
    (results / "w.json").write_text(json.dumps(
        {"workers": 16, "batch_size": 128, "crop": 224, "images_per_s": 557.36, "source": "1610 images"}))
    doc = tmp_path / "perf.md"
    doc.write_text(f"# title\n{BEGIN}\nold\n{END}\nfooter\n")
    update_doc(doc, results)
    text = doc.read_text()
    assert "old" not in text and text.startswith("# title\n") and text.endswith("footer\n")
    assert ("| l.json | NVIDIA H200 | 2.11 | vit_large | hierce | 2 (ddp) | no | 64 | 408.3 | 0.313 | 27.6% "
            "| 41.8 | 1.92x (109.7 img/s fp32) |").replace("| no |", "| none |") in text
    assert "| w.json | 16 | 128 | 224 | 557.4 | 1610 images |" in text
    # Files written before crops.photometric existed ran the photometric ops in the workers.
    assert "| 1.92x (109.7 img/s fp32) | loader | sync per step |" in text and "| 1610 images | loader |" in text
    # Files with the wall time of back-to-back steps are labelled so.
    assert "| m.json |" in text and "| 1.92x (109.7 img/s fp32) | device | back to back | autocast |" in text
    # Files written before compute.residual_stream existed ran a float32 stream.
    assert "| loader | sync per step | fp32 | - |" in text
    # A non-default drop-path mode is named.
    assert "| n.json |" in text and "| back to back | fp32 | drop path subset |" in text


@pytest.mark.slow
def test_profile_writes_an_op_table(tmp_path, tiny_overrides):
    table = tmp_path / "profile.txt"
    assert bench_main(["--steps", "1", "--warmup", "1", "--profile", str(table), *tiny_overrides]) == 0
    text = table.read_text()
    assert "Name" in text and "aten::" in text and "# of Calls" in text


def test_host_sync_sites_are_written_without_machine_prefixes():
    from bench.train_step import PROJECT_ROOT, _short_path

    assert _short_path(str(PROJECT_ROOT / "bench" / "train_step.py")) == "bench/train_step.py"
    assert _short_path("/opt/x/.venv/lib/python3.12/site-packages/torch/cuda/__init__.py") == "torch/cuda/__init__.py"
    assert _short_path("/elsewhere/tool.py") == "tool.py"


def test_timeline_busy_idle_and_kernel_kinds_from_a_trace():
    from bench.timeline import summarize, timeline

    events = [
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 100},  # host side: ignored
        {"ph": "X", "cat": "kernel", "name": "nvjet_sm90_tst_192x192", "ts": 0, "dur": 10},
        {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_gelu_view_1", "ts": 12, "dur": 8},  # 2 us gap
        {"ph": "X", "cat": "kernel", "name": "void at::native::multi_tensor_apply_kernel", "ts": 50, "dur": 10,
         "args": {"correlation": 7}},  # 30 us gap
        # The host side of that kernel: its launch call (same correlation) inside two CPU ops
        # of thread 1, and an op of another thread at the same time that must not count.
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 40, "dur": 3, "tid": 1,
         "args": {"correlation": 7}},
        {"ph": "X", "cat": "cpu_op", "name": "Optimizer.step#AdamW.step", "ts": 30, "dur": 20, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::_fused_adamw_", "ts": 38, "dur": 8, "tid": 1},
        {"ph": "X", "cat": "cpu_op", "name": "aten::other_thread", "ts": 39, "dur": 2, "tid": 2},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "ts": 55, "dur": 10},  # overlaps by 5 us
    ]
    from bench.timeline import kernel_kind

    # Inductor names a kernel after all the ops it fuses: the first matching kind counts.
    assert kernel_kind("triton_red_fused__to_copy_bitwise_not_clamp_min_div_exp_gt_masked_fill_mv_sub") == (
        "softmax, Sinkhorn-Knopp")
    assert kernel_kind("triton_per_fused__to_copy_add_mul_native_layer_norm_view_46") == "layer norm + residual"
    assert kernel_kind("triton_poi_fused__to_copy_37") == "dtype casts and copies"
    assert kernel_kind("void at::native::reduce_kernel<128, 4>") == "other"
    t = timeline(events, steps=2)
    # Span 65 us, busy 10 + 8 + 10 + 5 = 33 us, idle 32 us of which 30 in the gap over 20 us; per step: / 2.
    assert (t.span_ms, t.busy_ms, t.idle_ms, t.gaps_over_20us_ms, t.kernels) == pytest.approx(
        (0.0325, 0.0165, 0.016, 0.015, 2.0))
    assert t.by_kind_ms == pytest.approx(
        {"matmul": 0.005, "optimizer / EMA (foreach)": 0.005, "memset": 0.005, "gelu": 0.004})
    assert list(t.by_kind_ms)[-1] == "gelu"  # largest first
    assert t.top_kernels["gelu"] == [("triton_poi_fused_gelu_view_1", pytest.approx(0.004), 0.5)]
    # The 30 us gap: after the GELU kernel, before the optimizer's, launched from the fused AdamW op.
    assert t.top_gaps == [("triton_poi_fused_gelu_view_1", "void at::native::multi_tensor_apply_kernel",
                           "aten::_fused_adamw_", pytest.approx(0.015), 0.5)]
    text = summarize(events, steps=2).splitlines()
    assert text[0].endswith("(0.0 ms in gaps over 20 us), 2 kernels")
    assert text[-4].startswith("  gelu") and text[-3].split() == ["0.00", "ms", "0", "x", "triton_poi_fused_gelu_view_1"]
    assert text[-2] == "  gaps over 20 us, by the kernels around them"
    assert text[-1].split() == ["0.01", "ms", "0.5", "x", "after", "triton_poi_fused_gelu_view_1", "before", "void",
                                "at::native::multi_tensor_apply_kernel", "(launched", "from", "aten::_fused_adamw_)"]
    # Under each kind, the kernels with the most time (summed over launches), at most TOP_KERNELS.
    from bench.timeline import TOP_KERNELS

    casts = [{"ph": "X", "cat": "kernel", "name": f"triton_poi_fused__to_copy_{i}", "ts": 100 * i, "dur": 10 + i}
             for i in range(TOP_KERNELS + 2)]
    casts.append({"ph": "X", "cat": "kernel", "name": "triton_poi_fused__to_copy_0", "ts": 1000, "dur": 30})
    top = timeline(casts, steps=1).top_kernels["dtype casts and copies"]
    assert [name[-1] for name, _, _ in top] == ["0", "5", "4", "3"][:TOP_KERNELS]
    assert top[0][1:] == (pytest.approx(0.040), 2)
    assert timeline(events[:1], steps=1) is None and summarize([], 1) == "GPU timeline: no device activity in the trace"


def test_probe_benchmark_times_extraction_and_its_loader(tmp_path, capsys):
    from bench.probe import main as probe_main
    from bench.report import render
    from dinov2_hier.data import write_synthetic_dataset
    from dinov2_hier.hierarchy import Hierarchy
    from dinov2_hier.paths import PROJECT_ROOT

    tree = Hierarchy.from_json(PROJECT_ROOT / "hierarchies" / "synthetic.json")
    manifest = write_synthetic_dataset(tmp_path / "cells", 5, tree, image_size=40, seed=0)
    (tmp_path / "cells" / "images" / "000002.png").write_bytes(b"not an image")
    out = tmp_path / "perf" / "extract.json"
    out.parent.mkdir()
    argv = ["--ckpt", "none", "--arch", "vit_tiny", "--data", str(manifest), "--skip-probes",
            "--workers", "0", "--batch-size", "2", "--device", "cpu", "--json", str(out)]
    assert probe_main(argv) == 0
    capsys.readouterr()
    result = json.loads(out.read_text())
    assert set(result) == {"extraction"}  # --skip-probes: no kNN / logistic regression
    e = result["extraction"]
    assert e["images"] == 5 and e["unreadable"] == 1  # the broken file is counted, not fatal
    assert (e["arch"], e["crop"], e["dim"], e["batch_size"], e["workers"], e["device"]) == (
        "vit_tiny", 224, 192, 2, 0, "cpu")
    assert e["images_per_s"] == pytest.approx(5 / e["seconds"], rel=1e-12)
    assert e["loader_images_per_s"] == pytest.approx(5 / e["loader_seconds"], rel=1e-12)
    row = (f"| extract.json | cpu | {e['torch']} | vit_tiny | 224 | 2 | 0 | 5 | {e['images_per_s']:,.1f} "
           f"| {e['loader_images_per_s']:,.1f} |")
    text = render(out.parent)
    assert row in text and "### Feature extraction" in text and "### Probes" not in text


def test_benchmarks_report_bad_input_in_one_line_with_exit_code_2(tmp_path, capsys):
    from bench.loader import main as loader_main
    from bench.probe import main as probe_main

    missing = str(tmp_path / "missing.yaml")
    assert bench_main(["--config", missing, "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file not found: {missing}"
    assert loader_main(["--config", missing]) == 2
    assert capsys.readouterr().err.strip() == f"error: config file not found: {missing}"
    ckpt = str(tmp_path / "nope.pt")
    assert probe_main(["--ckpt", ckpt, "--data", str(tmp_path), "--skip-probes"]) == 2
    assert capsys.readouterr().err.strip() == f"error: checkpoint not found: {ckpt}"
    with pytest.raises(SystemExit) as exit_info:
        probe_main(["--skip-probes"])
    assert exit_info.value.code == 2 and "give --ckpt and --data" in capsys.readouterr().err


def test_bench_builds_the_step_parts_the_trainer_builds(tmp_path, tiny_overrides, monkeypatch):
    """bench/train_step.py and Trainer take their step from one builder (train/parts.py):
    for one config they get the same optimizer groups, schedules, clipping and precision."""
    from bench.train_step import build_bench_parts
    from dinov2_hier.config import load_config
    from dinov2_hier.train.loop import Trainer

    overrides = tiny_overrides + [
        "supervision.hierarchy=hierarchies/synthetic.json", "supervision.losses=[{name: hierce}]",
        "optim.clip_grad=1.5", "optim.clip_grad_mode=global",
    ]
    trainer = Trainer(load_config(None, overrides), tmp_path / "run", resume=False)
    trainer.release()
    bench_dir = tmp_path / "bench"
    bench_dir.mkdir()
    monkeypatch.chdir(bench_dir)
    parts, hierarchy = build_bench_parts(load_config(None, overrides), world_size=1, rank=0)
    assert list(bench_dir.iterdir()) == []  # no output directory, lock or log file
    assert hierarchy is not None and sorted(parts.model.supervised.keys()) == ["hierce"]

    def layout(optimizer):
        return [(g["lr_mult"], g["wd_mult"], g["is_last_layer"], len(g["params"]), sum(p.numel() for p in g["params"]))
                for g in optimizer.param_groups]

    assert layout(parts.optimizer) == layout(trainer.optimizer)
    groups = layout(parts.optimizer)
    assert len(groups) == 14 and sum(g[4] for g in groups) == 2_305_995
    assert groups[0][:2] == pytest.approx((0.9 ** 5, 1.0)) and groups[-1] == (1.0, 1.0, True, 2, 16640)
    expected = {  # (lr, wd, momentum, teacher_temp) at iterations 0, 1, 3, 5 of 6
        0: (0.0, 0.04, 0.992, 0.04),
        1: (1.767766952966369e-4, 0.0507179676972449, 0.9925358983848622, 0.055),
        3: (3.0192314190604367e-4, 0.12, 0.996, 0.07),
        5: (5.263024868723017e-5, 0.18928203230275512, 0.9994641016151378, 0.07),
    }
    for it, (lr, wd, momentum, temp) in expected.items():
        values = parts.schedules.values(it)
        assert values == trainer.schedules.values(it)
        assert (values["lr"], values["wd"], values["momentum"], values["teacher_temp"]) == pytest.approx(
            (lr, wd, momentum, temp), rel=1e-12)
        assert values["last_layer_lr"] == values["lr"] and values["supervision_weight"] == 1.0
    assert parts.clip_grad == 1.5 and parts.clip_per_group is False is trainer.clip_per_group
    assert sorted(parts.grad_groups) == sorted(trainer.grad_groups) == ["backbone", "dino_head", "supervised"]
    assert parts.compute.precision == trainer.precision and parts.compute.precision.dtype == "fp32"  # CPU
    assert parts.compute.parallel == trainer.parallel == "none" and parts.compute.device == trainer.device
    assert parts.scaler.is_enabled() is trainer.scaler.is_enabled() is False
    # The same seed before the model: the same initial weights.
    bench_state, trainer_state = parts.model.state_dict(), trainer.model.state_dict()
    assert bench_state.keys() == trainer_state.keys()
    assert all(torch.equal(bench_state[k], trainer_state[k]) for k in bench_state)
