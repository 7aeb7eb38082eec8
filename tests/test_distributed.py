"""Multi-process training on CPU (gloo, 2 processes) and the launcher-variable parsing.

The equivalence tests build, in the parent process, the single-process reference on the
combined batch: rank batches are crop-major each (``[crop 0 of its B images, crop 1]``),
so the combined batch is ``[r0 crop 0, r1 crop 0, r0 crop 1, r1 crop 1]`` (and masks,
targets in the same order). Per-sample losses, Sinkhorn-Knopp over the global batch and
the gathered SupCon / HierSupCon then see the same samples. KoLeo is off (weight 0): its
nearest neighbours are searched within a rank's batch, which differs from the combined
batch by design (DINOv2 does the same). Drop path is 0 and iBOT masks are explicit.
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from dinov2_hier import distributed
from dinov2_hier.config import ConfigError, load_config
from dinov2_hier.distributed import (
    DistInfo,
    DistributedSetupError,
    LaunchEnv,
    first_host,
    init_distributed,
    port_from_job_id,
    read_launch_env,
)
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.paths import PROJECT_ROOT
from tests.ports import free_ports
from dinov2_hier.train.__main__ import main as train_main
from dinov2_hier.train.checkpoint import TEACHER_FILE, list_checkpoints, load_checkpoint
from dinov2_hier.train.loop import METRICS_FILE, Trainer
from dinov2_hier.train.meta_arch import SSLMetaArch
from dinov2_hier.train.optim import build_optimizer, build_param_groups
from dinov2_hier.train.parallel import gather_model_state, gather_optimizer_state, resolve_parallel, wrap_model
from dinov2_hier.train.step import Precision, train_step

from .conftest import TINY_OVERRIDES

B = 4  # images per rank
N_PATCHES = 16  # 32 px crops, 8 px patches
TIMEOUT_S = 150  # a deadlock fails the test instead of hanging it
ATOL = 1e-5

_LAUNCH_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_STEP_NODELIST", "SLURM_NODELIST",
    "SLURM_JOB_ID",
)


# ------------------------------------------------------------------------------------------
# Launcher variables
# ------------------------------------------------------------------------------------------


def test_first_host_of_slurm_node_lists():
    assert first_host("node12") == "node12"
    assert first_host("gpu[003-005,010],cpu1") == "gpu003"
    assert first_host("cpu1,gpu[003-005]") == "cpu1"
    assert first_host("gpu[010,003]") == "gpu010"  # the list's order, not the smallest
    assert first_host("rack[1-2]-n[07-08]") == "rack1-n07"
    assert first_host("a-b.c[9]") == "a-b.c9"
    with pytest.raises(DistributedSetupError, match="unbalanced"):
        first_host("gpu[01-02")


def test_port_from_job_id_is_in_range_and_deterministic():
    assert port_from_job_id("4242") == 10000 + 4242
    assert port_from_job_id("123456") == 10000 + 123456 % 20000 == 13456
    assert port_from_job_id("777_3") == 10000 + 7773  # array job: its digits
    with pytest.raises(DistributedSetupError, match="SLURM_JOB_ID"):
        port_from_job_id("abc")


TORCHRUN_ENV = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n01", "MASTER_PORT": "29500"}
SRUN_ENV = {
    "SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "gpu[007-010]", "SLURM_JOB_ID": "123456",
}


def test_read_launch_env_torchrun_slurm_single():
    assert read_launch_env(TORCHRUN_ENV) == LaunchEnv("torchrun", 3, 8, 1, "n01", 29500)
    assert read_launch_env(SRUN_ENV) == LaunchEnv("slurm", 5, 16, 1, "gpu007", 13456)
    assert read_launch_env({}) == LaunchEnv("single", 0, 1, 0)
    # MASTER_* given explicitly win over the node list / job id; the step's task count and
    # node list win over the job's (srun may start fewer tasks than the allocation holds).
    explicit = {**SRUN_ENV, "MASTER_ADDR": "head", "MASTER_PORT": "1234"}
    assert read_launch_env(explicit) == LaunchEnv("slurm", 5, 16, 1, "head", 1234)
    step = {**SRUN_ENV, "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_NODELIST": "gpu[009-010]"}
    assert read_launch_env(step) == LaunchEnv("slurm", 5, 8, 1, "gpu009", 13456)
    # One task: no rendezvous address needed.
    assert read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == LaunchEnv("slurm", 0, 1, 0)


def test_torchrun_variables_win_over_slurm_ones():
    """torchrun inside an sbatch allocation: the SLURM variables describe the batch step
    (PROCID 0 of the allocation's tasks), torchrun's describe the worker."""
    env = {**SRUN_ENV, "SLURM_PROCID": "0", **TORCHRUN_ENV}
    assert read_launch_env(env) == LaunchEnv("torchrun", 3, 8, 1, "n01", 29500)


def test_cuda_device_is_the_local_rank_or_the_only_visible_gpu(monkeypatch):
    from dinov2_hier.distributed import _cuda_device_index

    launch = LaunchEnv("slurm", 5, 8, 3, "n1", 10000)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _cuda_device_index(launch) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # srun --gpus-per-task=1
    assert _cuda_device_index(launch) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(DistributedSetupError, match="SLURM_LOCALID=3 but this process sees 2 CUDA device"):
        _cuda_device_index(launch)


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE is set but RANK is not"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, r"RANK='x' is not an integer"),
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, r"RANK=2 is outside \[0, WORLD_SIZE=2\)"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK is not"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_PORT": "1"}, "MASTER_ADDR is not set"),
        ({"SLURM_PROCID": "4", "SLURM_NTASKS": "4"}, r"SLURM_PROCID=4 is outside \[0, SLURM_NTASKS=4\)"),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "9"}, "neither MASTER_ADDR nor SLURM_JOB_NODELIST"),
        ({"SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n1"}, "neither MASTER_PORT nor SLURM_JOB_ID"),
    ],
)
def test_read_launch_env_errors_name_the_variable(env, message):
    with pytest.raises(DistributedSetupError, match=message):
        read_launch_env(env)


def test_init_distributed_single_process_reads_os_environ(monkeypatch):
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    assert init_distributed() == DistInfo(0, 1, 0, None, "single")
    # torchrun --nproc_per_node=1 and a one-task srun create no process group either.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "4")  # the allocation's, ignored: torchrun's win
    assert init_distributed() == DistInfo(0, 1, 0, None, "torchrun")
    assert not distributed.is_enabled()
    distributed.destroy_distributed()  # harmless without a group
    # Single-process collectives are identities.
    assert distributed.mean_over_ranks({"a": torch.tensor(2.5)}) == {"a": 2.5}
    x = torch.arange(6.0).reshape(3, 2)
    assert distributed.all_gather_rows(x)[0] is x
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    assert distributed.new_host_group() is None
    assert torch.equal(distributed.mean_over_ranks_tensor({"a": torch.tensor(2.5), "b": torch.tensor(1)}), torch.tensor([2.5, 1.0]))


def test_resolve_parallel_validates_and_ignores_one_process():
    cfg = load_config(None, ["compute.dtype=fp32"])
    assert resolve_parallel(cfg, 1) == "none"
    assert resolve_parallel(cfg, 4) == "ddp"
    cfg.compute.parallel = "fsdp"
    assert resolve_parallel(cfg, 4) == "fsdp"
    # fp32 compute: the FSDP parameter dtypes follow (recorded in the saved config).
    assert (cfg.compute.fsdp.backbone_param_dtype, cfg.compute.fsdp.heads_param_dtype) == ("fp32", "fp32")
    cfg.compute.dtype = "fp16"
    with pytest.raises(ConfigError, match="fsdp does not support compute.dtype=fp16"):
        resolve_parallel(cfg, 2)
    with pytest.raises(ConfigError, match="compute.parallel must be one of ddp, fsdp, got 'zero'"):
        resolve_parallel(load_config(None, ["compute.parallel=zero"]), 2)
    with pytest.raises(ConfigError, match="compute.fsdp.reduce_dtype must be one of fp32, bf16, got 'fp16'"):
        resolve_parallel(load_config(None, ["compute.fsdp.reduce_dtype=fp16"]), 2)


# ------------------------------------------------------------------------------------------
# Process helpers
# ------------------------------------------------------------------------------------------


def _spawn(fn, args: tuple) -> None:
    """Run ``fn(rank, *args)`` in 2 processes; fail (and end them) after TIMEOUT_S."""
    context = mp.start_processes(fn, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.terminate()
                pytest.fail(f"2-process run did not finish within {TIMEOUT_S} s (deadlock?)")
    except mp.ProcessExitedException as err:
        # Say how far the ranks got: a crash after the work (in teardown) or during it.
        out_dir = Path(args[-1])
        written = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
        raise AssertionError(f"{err}; files the ranks had written in {out_dir}: {written}") from err


def _clean_launch_env() -> None:
    for name in _LAUNCH_VARS:
        os.environ.pop(name, None)


# ------------------------------------------------------------------------------------------
# Two ranks == one process on the combined batch (DDP and FSDP2)
# ------------------------------------------------------------------------------------------

EQUIV_OVERRIDES = TINY_OVERRIDES + [
    "dino.koleo_loss_weight=0",
    "student.drop_path_rate=0",
    # LayerScale 1e-5 would make every CLS token nearly the same at init: SupCon gradients
    # would then be float-cancellation noise, which AdamW's normalisation amplifies.
    "student.layerscale=null",
    "supervision.hierarchy=hierarchies/synthetic.json",
    "supervision.losses=[{name: hierce, hidden_dim: 32}, {name: supcon, projection_dim: 16, hidden_dim: 32},"
    " {name: hiersupcon, weight: 0.5}]",
    "compute.device=cpu",
]
SCHEDULES = [
    {"lr": 2e-3, "last_layer_lr": 0.0, "wd": 0.04, "momentum": 0.9, "teacher_temp": 0.05},
    {"lr": 2e-3, "last_layer_lr": 2e-3, "wd": 0.04, "momentum": 0.9, "teacher_temp": 0.05},
    {"lr": 1e-3, "last_layer_lr": 1e-3, "wd": 0.05, "momentum": 0.95, "teacher_temp": 0.06},
]
CLIP_GRAD = 3.0  # the default; the gradient norms here exceed it, so clipping acts and must agree


def _rank_batch(crops: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor) -> dict:
    """A collated batch (the fields ``compute_losses`` reads) from crop-major tensors."""
    per_crop = masks.sum(dim=-1, keepdim=True).clamp(min=1).float()
    return {
        "global_crops": crops,
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "masks_weight": (1.0 / per_crop).expand_as(masks)[masks],
        "targets": targets,
    }


def _combine(per_rank: list[dict]) -> dict:
    """The single-process batch of 2B images: crop 0 of rank 0's and rank 1's images, then crop 1."""
    def crop_major(key):
        halves = [t[key] for t in per_rank]
        return torch.cat([h[:B] for h in halves] + [h[B:] for h in halves])

    return _rank_batch(crop_major("global_crops"), crop_major("masks"), torch.cat([t["targets"] for t in per_rank]))


def _make_steps() -> list[list[dict]]:
    """Three steps of per-rank batches. Step 0 holds a NaN crop on rank 1 (every rank must
    skip it); on steps 0-1 rank 1 has no masked patch at all (it must still join the iBOT
    collectives)."""
    gen = torch.Generator().manual_seed(7)
    steps = []
    for step in range(3):
        ranks = []
        for rank in range(2):
            crops = torch.randn(2 * B, 3, 32, 32, generator=gen)
            masks = torch.rand(2 * B, N_PATCHES, generator=gen) < 0.4
            masks[::3] = False  # some crops unmasked
            if rank == 1 and step < 2:
                masks[:] = False
            if rank == 1 and step == 0:
                crops[2, 0, 5, 5] = float("nan")
            targets = torch.randint(0, 4, (B,), generator=gen)  # leaves 0-3, repeated: SupCon positives
            ranks.append(_rank_batch(crops, masks, targets))
        steps.append(ranks)
    return steps


def _equivalence_cfg():
    return load_config(None, EQUIV_OVERRIDES)


def _build(cfg):
    hierarchy = Hierarchy.from_json(PROJECT_ROOT / "hierarchies" / "synthetic.json")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg, hierarchy)
    return model


def _optimizer(cfg, model, fused: bool = False):
    """The training AdamW (``fused``: the kernel that skips non-finite steps on the device), with eps 1e-4 instead of 1e-8: AdamW's first steps move each
    weight by ``lr * g / (|g| + eps)``, so an element whose gradient is near a tiny eps turns
    float noise of 1e-7 (batch 8 vs 16 matmuls) into weight differences of ~1e-2 * lr. A
    larger eps keeps the update smooth in ``g``, so the comparison measures the distributed
    reductions rather than AdamW's conditioning; gradients themselves agree to ~1e-6."""
    groups = build_param_groups(model.trainable_modules(), model.n_blocks, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    optimizer = build_optimizer(groups, tuple(cfg.optim.betas), fused=fused)
    for group in optimizer.param_groups:
        group["eps"] = 1e-4
    return optimizer


# DDP and FSDP2 with the host-side skip; FSDP2 with the fused AdamW, whose skip of the
# NaN step is taken on the device on sharded (DTensor) parameters.
EQUIV_RUNS = ("ddp", "fsdp", "fsdp_fused")


def _run_steps(engine, optimizer, batches: list[dict]) -> list[dict]:
    precision = Precision("cpu", "fp32")
    scaler = precision.grad_scaler()
    outs = []
    for batch, schedule in zip(batches, SCHEDULES):
        out = train_step(engine, optimizer, scaler, batch, schedule, precision, CLIP_GRAD).read()
        outs.append({"losses": out.losses, "applied": out.applied, "grad_norm": out.grad_norm})
    return outs


def _equivalence_worker(rank: int, port: int, steps_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    _clean_launch_env()
    # srun-style variables; the port is derived from the job id (no MASTER_* set).
    os.environ.update({
        "SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
        "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": str(port - 10000),
    })
    info = init_distributed("gloo", timeout=datetime.timedelta(seconds=60))
    assert info == DistInfo(rank, 2, rank, "gloo", "slurm"), info
    try:
        # Host values agree over a gloo group; on a gloo job that is the default group.
        host = distributed.new_host_group()
        assert host is torch.distributed.group.WORLD
        assert distributed.all_reduce_sum(torch.tensor([rank + 1, 10]), host).tolist() == [3, 20]
        assert distributed.any_rank(rank == 1, "cpu", host)
        steps = torch.load(steps_file, weights_only=True)
        cfg = _equivalence_cfg()
        cfg.compute.dtype = "fp32"  # as resolve_compute leaves it on CPU
        report = {}
        for name in EQUIV_RUNS:
            mode = name.split("_")[0]
            cfg.compute.parallel = mode
            assert resolve_parallel(cfg, 2) == mode
            model = _build(cfg)
            engine = wrap_model(model, mode, cfg, torch.device("cpu"))
            optimizer = _optimizer(cfg, model, fused=name.endswith("_fused"))
            outs = _run_steps(engine, optimizer, [s[rank] for s in steps])
            model_state = gather_model_state(engine)
            optimizer_state = gather_optimizer_state(engine, optimizer)
            teacher_param = dict(model.named_parameters())["teacher.backbone.blocks.0.mlp.fc1.weight"]
            sharded_rows = tuple(teacher_param.to_local().shape) if hasattr(teacher_param, "to_local") else None
            report[name] = {"outs": outs, "teacher_local_shape": sharded_rows}
            if rank == 0:
                torch.save({"model": model_state, "optimizer": optimizer_state}, Path(out_dir) / f"{name}.pt")
        (Path(out_dir) / f"report_{rank}.json").write_text(json.dumps(report))
        # Teardown: free the wrapped modules and optimizers (they hold the process group and
        # its pending work) while the interpreter is fully alive, and let both ranks reach
        # destroy_process_group together. One CI run lost rank 1 to a SIGABRT ("terminate
        # called without an active exception") somewhere in this test; gloo's teardown racing
        # the other rank, or at interpreter exit, is the likely place (not reproduced).
        del model, engine, optimizer
        distributed.settle_before_destroy()
    finally:
        distributed.destroy_distributed()


def _assert_states_close(actual: dict, expected: dict, what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    worst = max((actual[k].float() - expected[k].float()).abs().max().item() for k in expected)
    assert worst < ATOL, f"{what}: max abs difference {worst:.2e}"


@pytest.mark.slow
def test_two_ranks_equal_one_process_on_the_combined_batch(tmp_path):
    steps = _make_steps()
    torch.save(steps, tmp_path / "steps.pt")
    _spawn(_equivalence_worker, (free_ports(1)[0], str(tmp_path / "steps.pt"), str(tmp_path)))

    # Reference: one process, batch 2B = the ranks' batches combined crop-major.
    cfg = _equivalence_cfg()
    model = _build(cfg)
    optimizer = _optimizer(cfg, model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ref = _run_steps(model, optimizer, [_combine(s) for s in steps])
    assert [o["applied"] for o in ref] == [False, True, True]
    expected = model.state_dict()
    assert any(not torch.equal(initial[k], expected[k]) for k in expected if k.startswith("teacher."))
    ref_optimizer = optimizer.state_dict()

    reports = [json.loads((tmp_path / f"report_{r}.json").read_text()) for r in range(2)]
    for mode in EQUIV_RUNS:
        saved = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
        # Student, teacher (EMA) and loss buffers after the three steps.
        _assert_states_close(saved["model"], expected, f"{mode} weights")
        # AdamW moments, in the single-process optimizer format (loads on any world size).
        assert [sorted(g) for g in saved["optimizer"]["param_groups"]] == [sorted(g) for g in ref_optimizer["param_groups"]]
        for index, state in ref_optimizer["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(saved["optimizer"]["state"][index][key], state[key], rtol=1e-4, atol=1e-7)
            assert float(saved["optimizer"]["state"][index]["step"]) == float(state["step"]) == 2.0
        for rank, report in enumerate(reports):
            outs = report[mode]["outs"]
            # The NaN on rank 1 made every rank skip step 0.
            assert [o["applied"] for o in outs] == [False, True, True], (mode, rank)
            for step in (1, 2):
                assert outs[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4)
                assert sorted(outs[step]["losses"]) == sorted(ref[step]["losses"])
                for name, value in ref[step]["losses"].items():
                    # Logged losses are rank means; with equal per-rank counts they equal
                    # the combined batch's (SupCon / HierSupCon: gathered, global).
                    assert outs[step]["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), (mode, step, name)
    # Under FSDP the teacher is sharded too: each rank holds half of fc1's 768 rows.
    assert [r["fsdp"]["teacher_local_shape"] for r in reports] == [[384, 192], [384, 192]]
    assert reports[0]["ddp"]["teacher_local_shape"] is None


# ------------------------------------------------------------------------------------------
# The training CLI under torchrun-style variables; checkpoints across world sizes
# ------------------------------------------------------------------------------------------

# No iBOT (its masks are drawn per rank batch, so 2 x 4 and 1 x 8 images get different
# masks) and no KoLeo (per-rank neighbours): then the two ranks' step on images 2B*it ..
# 2B*it + 2B - 1 (rank r takes the positions r, r + 2, ...) equals one process's step on
# the same images.
CLI_OVERRIDES = TINY_OVERRIDES + [
    "ibot.loss_weight=0", "dino.koleo_loss_weight=0", "student.layerscale=null", "compute.device=cpu",
    "train.iterations=4", "train.checkpoint_every=1",
]
ONE_PROCESS = [*CLI_OVERRIDES, f"train.batch_size_per_gpu={2 * B}"]
TWO_RANKS = [*CLI_OVERRIDES, f"train.batch_size_per_gpu={B}"]


def _cli_worker(rank: int, ports: list[int], runs: list[tuple[str, str]], out_dir: str) -> None:
    """For each (run dir, parallel mode): check that resuming the 1-process checkpoint on 2
    ranks loads exactly its weights, then train on to the end through the CLI."""
    torch.set_num_threads(1)
    _clean_launch_env()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1"})
    for i, (run_dir, mode) in enumerate(runs):
        overrides = [*TWO_RANKS, f"compute.parallel={mode}"]
        os.environ["MASTER_PORT"] = str(ports[2 * i])
        info = init_distributed(timeout=datetime.timedelta(seconds=60))
        assert info == DistInfo(rank, 2, rank, "gloo", "torchrun"), info
        try:
            trainer = Trainer(load_config(None, overrides), run_dir)
            loaded = gather_model_state(trainer.engine)
            iteration = trainer.state.iteration
            del trainer  # teardown as in _equivalence_worker
            distributed.settle_before_destroy()
        finally:
            distributed.destroy_distributed()
        if rank == 0:
            saved = load_checkpoint(list_checkpoints(Path(run_dir))[-1][1])["model"]
            exact = sorted(loaded) == sorted(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
            Path(out_dir, f"resume_{mode}.json").write_text(json.dumps({"iteration": iteration, "exact": exact}))
        os.environ["MASTER_PORT"] = str(ports[2 * i + 1])
        code = train_main(["--output-dir", run_dir, *overrides])
        assert code == 0, f"rank {rank}: exit code {code}"
        assert not distributed.is_enabled()  # the CLI tore its process group down


def _losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    return {r["iteration"]: r["loss_total"] for r in records}


def _iterations(run_dir: Path) -> list[int]:
    return [json.loads(line)["iteration"] for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def _copy_run(src: Path, dst: Path, up_to: int) -> Path:
    shutil.copytree(src, dst)
    for iteration, path in list_checkpoints(dst):
        if iteration > up_to:
            path.unlink()
    return dst


@pytest.mark.slow
def test_checkpoints_move_between_one_process_and_two_ranks(tmp_path):
    # One process, batch 2B, stops at iteration 2.
    assert train_main(["--output-dir", str(tmp_path / "one"), *ONE_PROCESS, "--stop-at", "2"]) == 0
    runs = [(str(_copy_run(tmp_path / "one", tmp_path / mode, 2)), mode) for mode in ("ddp", "fsdp")]
    ports = free_ports(4)
    _spawn(_cli_worker, (ports, runs, str(tmp_path)))
    # The one-process continuation on the same images.
    straight = _copy_run(tmp_path / "one", tmp_path / "straight", 2)
    assert train_main(["--output-dir", str(straight), *ONE_PROCESS]) == 0
    expected = _losses(straight)
    straight_weights = load_checkpoint(list_checkpoints(straight)[-1][1])["model"]

    for mode in ("ddp", "fsdp"):
        two = tmp_path / mode
        # 1 -> 2 ranks: the checkpoint of one process loads exactly on two ranks.
        assert json.loads((tmp_path / f"resume_{mode}.json").read_text()) == {"iteration": 2, "exact": True}
        # Only rank 0 wrote: one metrics record per iteration, one checkpoint per iteration.
        assert _iterations(two) == [1, 2, 3, 4]
        assert [it for it, _ in list_checkpoints(two)] == [1, 2, 3, 4]
        losses = _losses(two)
        # Iteration 3 starts from the same weights on the same 8 images: same loss (averaged
        # over the ranks); iteration 4 adds one AdamW step's float noise.
        assert losses[3] == pytest.approx(expected[3], rel=1e-5), mode
        assert losses[4] == pytest.approx(expected[4], rel=1e-4), mode
        last = load_checkpoint(list_checkpoints(two)[-1][1])
        assert last["world_size"] == 2 and len(last["rng_per_rank"]) == 2
        _assert_states_close(last["model"], straight_weights, f"{mode} run vs one process")
        # The teacher file is one plain file, equal to the checkpoint's (gathered) teacher.
        teacher = torch.load(two / TEACHER_FILE, map_location="cpu", weights_only=True)["model"]
        prefix = "teacher.backbone."
        assert sorted(teacher) == sorted(k[len(prefix):] for k in last["model"] if k.startswith(prefix))
        assert all(torch.equal(v, last["model"][prefix + k]) for k, v in teacher.items())

        # 2 ranks -> 1 process: resume from the 2-rank checkpoint of iteration 3.
        back = _copy_run(two, tmp_path / f"back_{mode}", 3)
        trainer = Trainer(load_config(None, ONE_PROCESS), back)
        ckpt3 = load_checkpoint(list_checkpoints(back)[-1][1])
        assert trainer.state.iteration == 3
        state = trainer.model.state_dict()
        assert sorted(state) == sorted(ckpt3["model"])
        assert all(torch.equal(state[k], ckpt3["model"][k]) for k in state)
        restored = trainer.optimizer.state_dict()["state"]
        assert all(torch.equal(restored[i]["exp_avg"], s["exp_avg"]) for i, s in ckpt3["optimizer"]["state"].items())
        trainer.run()
        # Same weights, same optimizer state, same images: the same next-step loss.
        assert _losses(back)[4] == pytest.approx(losses[4], rel=1e-5), mode


def test_compile_modes(monkeypatch, tiny_overrides):
    from dinov2_hier.config import ConfigError, load_config
    from dinov2_hier.train.meta_arch import SSLMetaArch
    from dinov2_hier.train.parallel import check_compile_mode, wrap_model

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append((self, k)))
    cfg = load_config(None, tiny_overrides + ["compute.compile=backbone"])
    model = SSLMetaArch(cfg)
    keys_before = list(model.state_dict())
    assert wrap_model(model, "none", cfg, torch.device("cpu")) is model
    assert [m for m, _ in compiled] == [model.student["backbone"], model.teacher["backbone"]]
    assert list(model.state_dict()) == keys_before

    compiled.clear()
    cfg = load_config(None, tiny_overrides + ["compute.compile=forward"])
    model = SSLMetaArch(cfg)
    assert wrap_model(model, "none", cfg, torch.device("cpu")) is model
    assert compiled == [(model, {})]  # the whole step's forward, fixed shapes

    compiled.clear()
    cfg = load_config(None, tiny_overrides)
    wrap_model(SSLMetaArch(cfg), "none", cfg, torch.device("cpu"))
    assert compiled == []  # default: none
    with pytest.raises(ConfigError, match="fsdp"):
        check_compile_mode("forward", "fsdp")
    with pytest.raises(ConfigError, match="none, backbone, forward"):
        check_compile_mode(True, "none")


def _scalars(output: tuple[dict, dict]) -> dict[str, float]:
    """A step forward's losses and diagnostics as one dict of floats."""
    losses, stats = output
    return {k: v.item() for k, v in {**losses, **stats}.items()}


@pytest.mark.parametrize("centering, supervised_crops", [("sinkhorn_knopp", "all"), ("softmax", "unmasked")])
@pytest.mark.slow
def test_step_forward_traces_as_one_graph(tiny_overrides, centering, supervised_crops):
    """compute.compile=forward pays off only if the whole forward is one graph: no host
    synchronisation (e.g. on the masked-patch count) and no data-dependent shape. Dynamo's
    fullgraph trace (backend "eager": no code generation) fails on any graph break."""
    from bench.train_step import synthetic_batch
    from dinov2_hier.config import load_config
    from dinov2_hier.hierarchy import Hierarchy
    from dinov2_hier.train.meta_arch import SSLMetaArch

    cfg = load_config(None, tiny_overrides + [
        "supervision.hierarchy=hierarchies/synthetic.json",
        "supervision.losses=[{name: hierce, hidden_dim: 32}, {name: hiersupcon, projection_dim: 16, hidden_dim: 32}]",
        f"dino.centering={centering}", f"ibot.centering={centering}", f"supervision.crops={supervised_crops}",
    ])
    hierarchy = Hierarchy.from_json("hierarchies/synthetic.json")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg, hierarchy)
    batch = synthetic_batch(cfg, torch.device("cpu"), hierarchy.num_leaves)
    assert batch["n_masked_patches"] < batch["mask_indices"].numel()  # padding is exercised
    # A copy: softmax centring updates its centre on every forward.
    reference = _scalars(copy.deepcopy(model)(batch, 0.07))
    torch._dynamo.reset()
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(model, backend=counting_backend, fullgraph=True)
    traced = compiled(batch, 0.07)
    assert _scalars(traced) == pytest.approx(reference, rel=1e-5)
    # The teacher temperature changes every iteration of its warm-up: after one recompile
    # it is a graph input, so new values (and new batches of the same shape) reuse the graph.
    for teacher_temp in (0.04, 0.05, 0.06):
        compiled(synthetic_batch(cfg, torch.device("cpu"), hierarchy.num_leaves, rank=1), teacher_temp)
    assert len(graphs) == 2


@pytest.mark.slow
def test_residual_stream_and_subset_drop_path_reach_the_backbones_and_trace_as_one_graph(tiny_overrides):
    """compute.residual_stream=autocast: student and teacher keep bf16 tokens between blocks
    under autocast (checked here with CPU bf16 autocast); student.drop_path_mode=subset:
    the student's blocks draw their rows on the device. Both in one fullgraph trace."""
    from bench.train_step import synthetic_batch
    from dinov2_hier.config import ConfigError, load_config
    from dinov2_hier.train.meta_arch import SSLMetaArch

    cfg = load_config(None, tiny_overrides + [
        "compute.residual_stream=autocast", "student.drop_path_mode=subset", "student.drop_path_rate=0.5",
    ])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg)
    assert model.student["backbone"].residual_stream == model.teacher["backbone"].residual_stream == "autocast"
    assert model.student["backbone"].drop_path_mode == "subset" and model.training
    batch = synthetic_batch(cfg, torch.device("cpu"), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.student["backbone"](batch["global_crops"])["x_prenorm"].dtype == torch.bfloat16
        torch.manual_seed(1)  # the same rows in the eager and the traced run
        reference = _scalars(model(batch, 0.07))
        torch.manual_seed(1)
        torch._dynamo.reset()
        graphs = []

        def counting_backend(graph_module, example_inputs):
            graphs.append(graph_module)
            return graph_module.forward

        traced = torch.compile(model, backend=counting_backend, fullgraph=True)(batch, 0.07)
    assert len(graphs) == 1
    assert _scalars(traced) == pytest.approx(reference, rel=1e-5)
    with pytest.raises(ConfigError, match="compute.residual_stream must be one of fp32, autocast, got 'bf16'"):
        SSLMetaArch(load_config(None, tiny_overrides + ["compute.residual_stream=bf16"]))
    with pytest.raises(ConfigError, match="student.drop_path_mode must be one of sample, subset, got 'batch'"):
        SSLMetaArch(load_config(None, tiny_overrides + ["student.drop_path_mode=batch"]))


def test_drop_path_schedule_from_the_config_and_from_configs_saved_before_it(tiny_overrides):
    from omegaconf import OmegaConf

    from dinov2_hier.config import ConfigError, load_config
    from dinov2_hier.train.meta_arch import SSLMetaArch, build_backbone_from_config

    def student_rates(cfg) -> list[float]:
        return [b.drop_path.rate for b in SSLMetaArch(cfg).student["backbone"].blocks]

    overrides = tiny_overrides + ["student.drop_path_rate=0.4"]
    linear = [0.0, 0.4 / 3, 0.8 / 3, 0.4]  # vit_tiny has 4 blocks
    assert student_rates(load_config(None, overrides)) == pytest.approx(linear)  # the default
    uniform = load_config(None, overrides + ["student.drop_path_schedule=uniform"])
    assert student_rates(uniform) == [0.4] * 4
    with pytest.raises(ConfigError, match="student.drop_path_schedule must be one of linear, uniform, got 'step'"):
        SSLMetaArch(load_config(None, overrides + ["student.drop_path_schedule=step"]))
    # A config saved before the key existed (as in an older checkpoint) ran the linear schedule.
    saved = OmegaConf.to_container(load_config(None, overrides))
    del saved["student"]["drop_path_schedule"]
    old = build_backbone_from_config(OmegaConf.create(saved))
    assert [b.drop_path.rate for b in old.blocks] == pytest.approx(linear)


# ------------------------------------------------------------------------------------------
# supervision.crops=unmasked: per-crop targets gathered in the tokens' order
# ------------------------------------------------------------------------------------------

def _gather_worker(rank: int, port: int, out_dir: str) -> None:
    from dinov2_hier.train.meta_arch import gather_crop_major

    torch.set_num_threads(1)
    _clean_launch_env()
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    init_distributed("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        n = 2 + rank  # rank 0: 2 images, rank 1: 3 (uneven batches)
        # Token row value = 100 * rank + row; per-row target = 10 * rank + row.
        tokens = (100 * rank + torch.arange(2 * n, dtype=torch.float32)).unsqueeze(1).repeat(1, 2)
        per_row = 10 * rank + torch.arange(2 * n)
        gathered_tokens, gathered_targets = gather_crop_major(tokens, per_row)
        _, per_image = gather_crop_major(tokens, per_row[:n])
        (Path(out_dir) / f"gather_{rank}.json").write_text(json.dumps({
            "tokens": gathered_tokens[:, 0].tolist(), "per_row": gathered_targets.tolist(),
            "per_image": per_image.tolist()}))
        distributed.settle_before_destroy()
    finally:
        distributed.destroy_distributed()


@pytest.mark.slow
def test_per_crop_targets_gather_in_the_order_of_the_tokens(tmp_path):
    """Rank 0 holds 2 images (rows 0-3), rank 1 holds 3 (rows 0-5): the global crop-major
    batch is crop 0 of r0 (0, 1), crop 0 of r1 (100, 101, 102), crop 1 of r0 (2, 3), crop 1
    of r1 (103, 104, 105); per-row targets follow the same order, per-image ones stay [5]."""
    _spawn(_gather_worker, (free_ports(1)[0], str(tmp_path)))
    for rank in range(2):
        got = json.loads((tmp_path / f"gather_{rank}.json").read_text())
        assert got["tokens"] == [0, 1, 100, 101, 102, 2, 3, 103, 104, 105]
        assert got["per_row"] == [0, 1, 10, 11, 12, 2, 3, 13, 14, 15]
        assert got["per_image"] == [0, 1, 10, 11, 12]
