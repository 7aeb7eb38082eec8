"""SLURM launching without a cluster: submitit parameters, the debug executor end to end, the
preemption path through submitit's own signal handler, signal handlers of the training CLI,
multi-rank stop agreement (gloo, 2 processes) and the sbatch scripts (run with stub
``srun``/``scontrol``)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinov2_hier.config import load_config, parse_overrides
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.run import submit as submit_mod
from dinov2_hier.run.signals import StopFlag, stop_on_signals
from dinov2_hier.run.submit import (
    TrainingJob, executor_parameters, main, parse_args, sbatch_lines, stop_timeout_s,
)
from dinov2_hier.train.checkpoint import TEACHER_FILE, list_checkpoints
from dinov2_hier.train.loop import METRICS_FILE, Trainer

from tests.conftest import TINY_OVERRIDES

DEMO = str(PROJECT_ROOT / "configs" / "demo.yaml")
SLURM_DIR = PROJECT_ROOT / "slurm"
ARCHS = {"vitl": "vitl14", "vits": "vits14"}
ARMS = ("unsup", "ce", "supcon", "hierce", "hiersupcon")


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


@pytest.fixture
def single_process(monkeypatch):
    """No launcher variables (even if the tests run inside a SLURM allocation): the job's
    init_distributed then sees a world of one and creates no process group."""
    torch.set_num_threads(1)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


# -- parameters ------------------------------------------------------------------------------
FULL_ARGS = [
    "--config", "configs/train/vitl14_hierce.yaml", "--output-dir", "runs/x", "--nodes", "2", "--ngpus", "8",
    "--partition", "gpu", "--timeout", "720", "--account", "proj", "--qos", "high", "--constraint", "a100",
    "--cpus-per-task", "12", "--mem-gb", "480", "--job-name", "hier", "--signal-delay-s", "240",
    "--setup", "module load cuda", "data.train=[a.csv]",
]


def test_executor_parameters_map_every_flag():
    assert executor_parameters(parse_args(FULL_ARGS)) == {
        "name": "hier",
        "nodes": 2,
        "gpus_per_node": 8,
        "tasks_per_node": 8,
        "cpus_per_task": 12,
        "timeout_min": 720,
        "mem_gb": 480.0,
        "slurm_partition": "gpu",
        "slurm_account": "proj",
        "slurm_qos": "high",
        "slurm_constraint": "a100",
        "slurm_signal_delay_s": 240,
        "slurm_setup": ["module load cuda"],
        "slurm_additional_parameters": {"requeue": True},
    }


def test_executor_parameters_defaults_and_cpu_job():
    args = parse_args(["--config", "configs/train/vits14_ce.yaml", "--output-dir", "r", "--ngpus", "0"])
    assert executor_parameters(args) == {
        "name": "dinov2_hier-vits14_ce",
        "nodes": 1,
        "tasks_per_node": 1,  # one CPU task, no --gpus-per-node=0 line
        "cpus_per_task": 10,
        "timeout_min": 1440,
        "slurm_signal_delay_s": 180,
        "slurm_additional_parameters": {"requeue": True},
    }
    assert stop_timeout_s(180) == 150.0 and stop_timeout_s(20) == 10.0


def test_sbatch_lines_as_submitit_writes_them():
    params = executor_parameters(parse_args(FULL_ARGS))
    lines = sbatch_lines(params, signal_name="USR2")
    assert lines == [
        "#SBATCH --account=proj",
        "#SBATCH --constraint=a100",
        "#SBATCH --cpus-per-task=12",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --job-name=hier",
        "#SBATCH --mem=480GB",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --qos=high",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR2@240",
        "#SBATCH --time=720",
    ]
    # Cross-check with submitit's own sbatch writer (a private function: skipped if it moves).
    slurm = pytest.importorskip("submitit.slurm.slurm")
    make = getattr(slurm, "_make_sbatch_string", None)
    if make is None:
        pytest.skip("submitit's sbatch writer moved")
    text = make(
        command="true", folder="/nonexistent", job_name="hier", partition="gpu", time=720, nodes=2,
        ntasks_per_node=8, cpus_per_task=12, gpus_per_node=8, qos="high", mem="480GB", signal_delay_s=240,
        constraint="a100", account="proj", additional_parameters={"requeue": True}, setup=["module load cuda"],
    )
    theirs = {line for line in text.splitlines() if line.startswith("#SBATCH")}
    assert set(lines) <= theirs, set(lines) - theirs


# -- the command line --------------------------------------------------------------------------
def test_dry_run_prints_parameters_and_submits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(submit_mod, "make_executor", lambda *a, **k: pytest.fail("dry run built an executor"))
    out_dir = tmp_path / "run"
    argv = ["--config", DEMO, "--output-dir", str(out_dir), "--nodes", "2", "--ngpus", "4", "--partition", "p1",
            "--dry-run", "train.iterations=7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    block = out.split("parameters =\n", 1)[1].split("\n# ", 1)[0]
    assert json.loads(block) == executor_parameters(parse_args(argv))
    assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=4" in out and "#SBATCH --partition=p1" in out
    assert "dinov2_hier.run.submit.TrainingJob(" in out and "'train.iterations=7'" in out
    assert "nothing was submitted" in out
    assert not out_dir.exists()


@pytest.mark.slow
def test_dry_run_through_python_dash_m_names_the_importable_class(tmp_path):
    """Run as ``python -m``, the job class must still be dinov2_hier.run.submit.TrainingJob
    (a pickled ``__main__.TrainingJob`` could not be loaded by the job)."""
    proc = subprocess.run(
        [sys.executable, "-m", "dinov2_hier.run.submit", "--config", DEMO, "--output-dir", str(tmp_path / "r"),
         "--dry-run"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "# job: dinov2_hier.run.submit.TrainingJob(" in proc.stdout


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.iteratons=5"], "unknown config key 'train.iteratons'"),
        (["--config", "configs/nope.yaml"], "config file not found"),
        (["--timeout", "2", "--signal-delay-s", "120"], "--signal-delay-s 120 is not shorter than --timeout 2"),
    ],
)
def test_bad_input_exits_2_before_any_submission(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(submit_mod, "make_executor", lambda *a, **k: pytest.fail("submitted despite bad input"))
    argv = ["--config", DEMO, "--output-dir", str(tmp_path / "r"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err  # one line, no traceback


def test_missing_slurm_is_a_user_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no srun/sbatch anywhere
    assert main(["--config", DEMO, "--output-dir", str(tmp_path / "r"), "--cluster", "slurm"]) == 2
    assert "cannot submit to 'slurm'" in capsys.readouterr().err


def test_debug_executor_trains_end_to_end(tmp_path, capsys, single_process):
    run = tmp_path / "run"
    argv = ["--config", DEMO, "--output-dir", str(run), "--cluster", "debug", "--ngpus", "0", *TINY_OVERRIDES]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {
        "output_dir": str(run.resolve()), "rank": 0, "world_size": 1,
        "start_iteration": 0, "iteration": 6, "interrupted": False,
    }
    assert [it for it, _ in list_checkpoints(run)] == [3, 6]
    assert (run / TEACHER_FILE).is_file() and (run / "submitit").is_dir()
    assert [r["iteration"] for r in _metrics(run)] == [1, 2, 3, 4, 5, 6]


# -- preemption ----------------------------------------------------------------------------------
def test_job_pickles_without_runtime_state_and_checkpoint_returns_equal_job():
    import pickle

    import submitit

    job = TrainingJob(config="c.yaml", output_dir="out", overrides=["a=1"], stop_timeout_s=5)
    assert job.overrides == ("a=1",)
    delayed = job.checkpoint()  # no run in progress: nothing to wait for
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    assert delayed.function == job and delayed.args == () and delayed.kwargs == {}
    clone = pickle.loads(pickle.dumps(job))
    assert clone == job and clone._run is None


def _usr2_at_second_poll():
    """A ``StopFlag.__call__`` that gates the loop's stop poll after iteration 2 (the loop
    polls after iterations 1, 2, ...): it raises SIGUSR2 there and waits until the handler
    (main thread) has set the flag, so the stop lands exactly there. Returns it and the
    list of what each poll returned."""
    polls = []

    def gated_poll(flag: StopFlag) -> bool:
        if len(polls) == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not flag.is_set() and time.monotonic() < deadline:
                time.sleep(0.01)
        polls.append(flag.is_set())
        return polls[-1]

    return gated_poll, polls


@pytest.mark.slow
def test_preemption_signal_checkpoints_then_the_requeued_job_resumes(tmp_path, monkeypatch, single_process):
    """The cluster's path, in one process: submitit's own signal handler (installed as in a
    SLURM task, with the debug job environment whose requeue is a no-op) receives USR2 while
    the tiny training is paused after iteration 2. It calls TrainingJob.checkpoint(), which
    waits until the worker has written the iteration-2 checkpoint; submitit pickles the
    returned DelayedSubmission and exits. Loading that pickle and running it resumes at
    iteration 2 and reproduces the losses and weights of an uninterrupted run."""
    import submitit
    from submitit.core.utils import DelayedSubmission

    run = tmp_path / "run"
    job = TrainingJob(config=DEMO, output_dir=str(run), overrides=TINY_OVERRIDES, stop_timeout_s=60)

    gated_poll, polls = _usr2_at_second_poll()
    monkeypatch.setattr(StopFlag, "__call__", gated_poll)
    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", "4242")
    (tmp_path / "submitit").mkdir()  # exists in a real job: the submitted pickle lives there
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path / "submitit"))
    monkeypatch.setattr(submitit.JobEnvironment, "USR_SIG", "USR2")
    env = submitit.JobEnvironment()
    delayed = DelayedSubmission(job)
    delayed.set_timeout(60, 3)  # 60 min limit, 3 timeouts left: this is a preemption
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    try:
        env._handle_signals(env.paths, delayed)
        with pytest.raises(SystemExit):  # submitit requeues, then exits the process
            delayed.result()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)

    assert job.stop_flag.reason == "submitit checkpoint: preemption or time limit"
    assert [it for it, _ in list_checkpoints(run)] == [2]  # written before submitit requeued
    assert [r["iteration"] for r in _metrics(run)] == [1, 2]
    assert "stop requested at iteration 2" in (run / "log.txt").read_text()

    requeued = DelayedSubmission.load(env.paths.submitted_pickle)
    assert requeued.function == job and requeued.function._run is None
    assert polls == [False, True]
    monkeypatch.setattr(StopFlag, "__call__", StopFlag.is_set)
    summary = requeued.result()
    assert (summary["start_iteration"], summary["iteration"], summary["interrupted"]) == (2, 6, False)
    assert [it for it, _ in list_checkpoints(run)] == [2, 3, 6]

    straight = tmp_path / "straight"
    Trainer(load_config(DEMO, TINY_OVERRIDES), straight).run()
    resumed, uninterrupted = _metrics(run), _metrics(straight)
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(uninterrupted, resumed):
        for key in ("loss_dino", "loss_ibot", "loss_koleo", "loss_total", "lr"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["iteration"], key)
    w_a = torch.load(list_checkpoints(straight)[-1][1], weights_only=True)["model"]
    w_b = torch.load(list_checkpoints(run)[-1][1], weights_only=True)["model"]
    assert all(torch.allclose(w_a[k], w_b[k], atol=1e-5) for k in w_a)


# -- the training CLI's signal handlers -----------------------------------------------------------
def _deliver(flag: StopFlag) -> None:
    for _ in range(200):  # the handler runs in this (main) thread at the next bytecode boundary
        if flag.is_set():
            return
        time.sleep(0.005)


def test_stop_on_signals_sets_flag_and_restores_previous_handler():
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    old = signal.signal(signal.SIGUSR1, previous)
    try:
        with stop_on_signals((signal.SIGUSR1, signal.SIGTERM)) as flag:
            assert not flag.is_set() and flag.reason == "" and flag() is False
            os.kill(os.getpid(), signal.SIGUSR1)
            _deliver(flag)
            assert flag.is_set() and flag() is True and flag.reason == "signal SIGUSR1"
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal keeps the first reason
            time.sleep(0.05)
            assert flag.reason == "signal SIGUSR1" and calls == []
            assert flag.any_rank() is True  # no process group: the local flag
        assert signal.getsignal(signal.SIGUSR1) is previous
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGUSR1)
        for _ in range(200):
            if calls:
                break
            time.sleep(0.005)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_training_under_stop_on_signals_checkpoints_on_sigusr1(tmp_path, single_process):
    """What the training CLI does (Trainer inside ``stop_on_signals``): SIGUSR1 arriving
    during iteration 2 makes the loop write a checkpoint after it and return."""
    trainer = Trainer(load_config(DEMO, TINY_OVERRIDES), tmp_path / "run")
    polls = []
    with stop_on_signals() as stop:

        def poll() -> bool:
            if len(polls) == 1:  # after iteration 2
                os.kill(os.getpid(), signal.SIGUSR1)
                _deliver(stop)
            polls.append(stop())
            return polls[-1]

        state = trainer.run(should_stop=poll)
    assert (state.iteration, state.interrupted, stop.reason) == (2, True, "signal SIGUSR1")
    assert [it for it, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert Trainer(load_config(DEMO, TINY_OVERRIDES), tmp_path / "run").state.iteration == 2  # resumes there


@pytest.mark.skipif(
    "stop_on_signals" not in (PROJECT_ROOT / "dinov2_hier" / "train" / "__main__.py").read_text(),
    reason="the training CLI does not install stop_on_signals yet",
)
@pytest.mark.slow
def test_training_cli_stops_cleanly_on_sigusr1(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    for var in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dinov2_hier.train", "--config", DEMO, "--output-dir", str(run), *TINY_OVERRIDES,
         "train.iterations=400", "train.checkpoint_every=1000"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ((run / METRICS_FILE).exists() and (run / METRICS_FILE).read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    last = _metrics(run)[-1]["iteration"]
    assert 1 <= last < 400
    assert [it for it, _ in list_checkpoints(run)] == [last]  # written on the signal, nothing else
    assert f"stop requested at iteration {last}" in (run / "log.txt").read_text()


def test_stop_on_signals_restores_handlers_when_the_block_raises():
    old = signal.getsignal(signal.SIGUSR2)
    with pytest.raises(KeyError):
        with stop_on_signals((signal.SIGUSR2,)):
            assert signal.getsignal(signal.SIGUSR2) is not old
            raise KeyError("boom")
    assert signal.getsignal(signal.SIGUSR2) is old


def _agreement_worker(rank: int, init_file: str, results: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        flag = StopFlag()
        first = flag.any_rank()  # nobody asked yet
        if rank == 1:
            flag.set("signal SIGUSR1")  # only rank 1 got the signal (as with submitit: rank 0 only)
        second = flag.any_rank()
        results[rank] = (first, second, flag.reason)
    finally:
        dist.destroy_process_group()


def test_any_rank_stops_every_rank_at_the_same_poll(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        # fork: the children need no fresh interpreter (a spawn would re-import torch, ~15 s here)
        mp.start_processes(
            _agreement_worker, args=(str(tmp_path / "rendezvous"), results), nprocs=2, join=True, start_method="fork"
        )
        results = dict(results)
    assert results == {
        0: (False, True, "another rank was asked to stop"),
        1: (False, True, "signal SIGUSR1"),
    }


# -- the sbatch scripts --------------------------------------------------------------------------
def _wrappers() -> list[Path]:
    return sorted(SLURM_DIR.glob("pretrain_*.sh"))


def test_every_arch_and_arm_has_a_script_naming_an_existing_config():
    names = {p.name for p in _wrappers()}
    assert names == {f"pretrain_{a}_{arm}.sh" for a in ARCHS for arm in ARMS}
    for arch, cfg in ARCHS.items():
        for arm in ARMS:
            text = (SLURM_DIR / f"pretrain_{arch}_{arm}.sh").read_text()
            config = re.search(r'^CONFIG="\$\{CONFIG:-([^}]+)\}"$', text, re.M).group(1)
            assert config == f"configs/train/{cfg}_{arm}.yaml" and (PROJECT_ROOT / config).is_file()
            sbatch = re.findall(r"^#SBATCH (\S+)", text, re.M)
            assert "--signal=B:USR1@180" in sbatch and "--requeue" in sbatch and "--open-mode=append" in sbatch
            ntasks = [s for s in sbatch if s.startswith("--ntasks-per-node=")][0].split("=")[1]
            gpus = [s for s in sbatch if s.startswith("--gpus-per-node=")][0].split("=")[1]
            assert ntasks == gpus  # one task per GPU
            assert not any(s.startswith(("--partition", "--account", "--qos")) for s in sbatch)
            assert text.rstrip().endswith('source slurm/common.sh "$@"')


def test_scripts_parse_and_hold_no_absolute_site_paths():
    scripts = sorted(SLURM_DIR.glob("*.sh"))
    assert len(scripts) == 11
    # An absolute path starts a word: after a line start, a blank, = or a quote.
    absolute = re.compile(r"""(?:^|[\s="'(:>-])(/[A-Za-z][^\s"');]*)""")
    for script in scripts:
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, (script.name, proc.stderr)
        lines = script.read_text().splitlines()
        found = [m for line in lines[1:] for m in absolute.findall(line)]
        assert found == ["/dev/null"] * len(found), (script.name, found)  # only /dev/null
        if script.name != "common.sh":
            assert lines[0] == "#!/bin/bash"


STUB_SRUN = """#!/bin/bash
echo "srun $*" >> "$STUB_LOG"
echo "env SRUN_CPUS_PER_TASK=${SRUN_CPUS_PER_TASK:-} OMP_NUM_THREADS=$OMP_NUM_THREADS ACTIVATED=${ACTIVATED:-}" >> "$STUB_LOG"
trap 'echo "task got USR1" >> "$STUB_LOG"; exit "${STUB_EXIT:-0}"' USR1
if [[ "${STUB_SEND_SIGNAL:-0}" == 1 ]]; then kill -s USR1 "$PPID"; fi
for _ in $(seq 10); do sleep 0.05; done
echo "task finished" >> "$STUB_LOG"
exit "${STUB_EXIT:-0}"
"""
STUB_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$STUB_LOG"
"""


def _run_script(tmp_path, name="pretrain_vits_hierce.sh", args=(), **env_vars):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for stub, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / stub).write_text(text)
        (bin_dir / stub).chmod(0o755)
    log = tmp_path / "stub.log"
    log.unlink(missing_ok=True)
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log), "SLURM_JOB_ID": "12345",
        "SLURM_JOB_NODELIST": "node[7-8]", "SLURM_CPUS_PER_TASK": "10", "SLURM_SUBMIT_DIR": str(PROJECT_ROOT),
        "DATA_TRAIN": "synthetic,my cells.csv", **env_vars,
    }
    proc = subprocess.run(["bash", str(SLURM_DIR / name), *args], env=env, capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    return proc, (log.read_text().splitlines() if log.exists() else [])


def test_script_runs_one_training_per_task_with_the_arm_config(tmp_path):
    # ACTIVATE runs first; it may read unset variables, as conda's activation scripts do.
    proc, log = _run_script(tmp_path, args=["train.iterations=10"], ACTIVATE='export ACTIVATED="yes$NOT_SET"')
    assert proc.returncode == 0, proc.stderr
    assert log[0] == (
        "srun --kill-on-bad-exit=1 python -m dinov2_hier.train --config configs/train/vits14_hierce.yaml "
        "--output-dir runs/vits14_hierce data.train=['synthetic','my cells.csv'] train.iterations=10"
    )
    assert log[1] == "env SRUN_CPUS_PER_TASK=10 OMP_NUM_THREADS=1 ACTIVATED=yes"
    assert log[2:] == ["task finished"]  # no signal: no requeue
    override = re.search(r"(data\.train=\[.*\]) ", log[0]).group(1)
    assert list(parse_overrides([override]).data.train) == ["synthetic", "my cells.csv"]


@pytest.mark.parametrize(
    "task_exit, restarts, requeued",
    [(0, "0", True), (3, "0", False), (0, "50", False)],
)
def test_time_limit_signal_is_forwarded_then_the_job_requeues(tmp_path, task_exit, restarts, requeued):
    proc, log = _run_script(
        tmp_path, STUB_SEND_SIGNAL="1", STUB_EXIT=str(task_exit), SLURM_RESTART_COUNT=restarts,
    )
    assert proc.returncode == task_exit, proc.stderr
    assert "task got USR1" in log and "task finished" not in log  # the task stopped on the signal
    assert ("scontrol requeue 12345" in log) is requeued, log
    assert log[-1] == ("scontrol requeue 12345" if requeued else "task got USR1")


def test_script_without_data_or_outside_slurm_exits_2(tmp_path):
    proc, log = _run_script(tmp_path, DATA_TRAIN="")
    assert proc.returncode == 2 and "set DATA_TRAIN" in proc.stderr and log == []
    proc, log = _run_script(tmp_path, SLURM_JOB_ID="")
    assert proc.returncode == 2 and "not inside a SLURM job" in proc.stderr and log == []


def _preempted_rank(rank: int, port: int, run_dir: str, submitit_dir: str, results: dict) -> None:
    """One of two forked ranks (gloo). Rank 0 is set up as in a submitit SLURM task and gets
    the preemption signal after iteration 2; rank 1 gets nothing (submitit acts on rank 0)."""
    import submitit
    from submitit.core.utils import DelayedSubmission

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    job = TrainingJob(config=DEMO, output_dir=run_dir, overrides=TINY_OVERRIDES, stop_timeout_s=60)
    if rank == 1:
        results[1] = (job(), job.stop_flag.reason)
        return
    gated_poll, _ = _usr2_at_second_poll()
    StopFlag.__call__ = gated_poll  # this child exits afterwards: no need to undo
    os.environ.update(SUBMITIT_DEBUG_JOB_ID="4343", SUBMITIT_FOLDER=submitit_dir)
    submitit.JobEnvironment.USR_SIG = "USR2"
    env = submitit.JobEnvironment()
    delayed = DelayedSubmission(job)
    delayed.set_timeout(60, 3)
    env._handle_signals(env.paths, delayed)
    try:
        delayed.result()
        results[0] = ("returned", job.stop_flag.reason)
    except SystemExit:
        results[0] = ("exited after requeue", job.stop_flag.reason)


@pytest.mark.slow
def test_two_rank_preemption_stops_both_ranks_at_the_same_iteration(tmp_path, single_process):
    """Only rank 0 is told (as submitit does); the loop's all-reduced stop poll stops rank 1
    at the same iteration, rank 0 writes the checkpoint, and the requeued job resumes there
    (here on one process: the checkpoint does not depend on the number of ranks)."""
    import socket

    import torch.multiprocessing as mp
    from submitit.core.utils import DelayedSubmission

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run, folder = tmp_path / "run", tmp_path / "submitit"
    folder.mkdir()
    with mp.Manager() as manager:
        shared = manager.dict()
        mp.start_processes(
            _preempted_rank, args=(port, str(run), str(folder), shared), nprocs=2, join=True, start_method="fork"
        )
        results = dict(shared)
    assert results[0] == ("exited after requeue", "submitit checkpoint: preemption or time limit")
    summary_1, reason_1 = results[1]
    assert reason_1 == ""  # rank 1's own flag was never set: the loop's all-reduce stopped it
    assert summary_1 == {
        "output_dir": str(run), "rank": 1, "world_size": 2, "start_iteration": 0, "iteration": 2, "interrupted": True,
    }
    assert [it for it, _ in list_checkpoints(run)] == [2]
    assert [r["iteration"] for r in _metrics(run)] == [1, 2]

    requeued = DelayedSubmission.load(folder / "4343_submitted.pkl")
    summary = requeued.result()
    assert (summary["world_size"], summary["start_iteration"], summary["iteration"]) == (1, 2, 6)
    assert [it for it, _ in list_checkpoints(run)] == [2, 3, 6]


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpu_nccl_job_is_signalled_checkpoints_requeues_and_resumes(tmp_path):
    """On a 2-GPU machine (no SLURM): submitit's local executor runs 2 tasks (NCCL), signals
    them 60 s into each attempt as SLURM would near a time limit, and requeues. Attempt 1
    stops at k1 and checkpoints; attempt 2 resumes from k1, stops at k2 > k1, checkpoints,
    and submitit gives up (max_num_timeout=1), so the job ends with that message."""
    import submitit

    run = tmp_path / "run"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit", max_num_timeout=1)
    executor.update_parameters(tasks_per_node=2, gpus_per_node=2, timeout_min=2.0, signal_delay_s=60)
    job = executor.submit(TrainingJob(
        config=str(PROJECT_ROOT / "configs" / "train" / "vits14.yaml"), output_dir=str(run), stop_timeout_s=50,
        overrides=["data.train=[synthetic]", "data.num_workers=4", "train.batch_size_per_gpu=32",
                   "train.iterations=1000000", "train.checkpoint_every=1000000", "train.log_every=10"],
    ))
    with pytest.raises(Exception, match="timed-out too many times"):
        job.results()
    stops = [it for it, _ in list_checkpoints(run)]
    log = (run / "log.txt").read_text()
    assert len(stops) == 2 and 0 < stops[0] < stops[1], (stops, log[-2000:])
    assert f"resumed from {run / 'checkpoints' / f'ckpt_{stops[0]:08d}.pt'} at iteration {stops[0]}" in log
    assert log.count("stop requested at iteration") == 2 and "distributed: 2 ranks, backend nccl" in log
