"""Issue 19, items 18 and 20: default CPU threads and loader workers, and the log's noise
(torch's too-many-workers warning, L-BFGS warnings of inner CV fits, progress bars in files,
a silent start of training, the last step's images/s)."""
from __future__ import annotations

import io
import json
import logging
import time
import warnings

import numpy as np
import pytest
import torch

from dinov2_hier import cpu
from dinov2_hier.config import load_config
from dinov2_hier.data import EvalTransform, write_synthetic_dataset
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.paths import PROJECT_ROOT
from dinov2_hier.train import loop
from dinov2_hier.train.loop import Trainer
from eval.extraction import Progress as _Progress
from eval.features import eval_image_loader, extract_features, load_eval_backbone
from eval.probes import LogRegProbe

HIERARCHY = PROJECT_ROOT / "hierarchies" / "synthetic.json"


# -- item 18 / 20a: thread and worker policy -----------------------------------------------
def test_loader_workers_are_capped_by_the_cores():
    # feature extraction keeps one core for the main process (the model)
    assert cpu.loader_workers(4, "t", cores=2) == 1
    assert cpu.loader_workers(4, "t", cores=1) == 1
    assert cpu.loader_workers(4, "t", cores=16) == 4
    assert cpu.loader_workers(0, "t", cores=2) == 0  # in-process stays in-process
    # training: only what torch itself calls too many (more than the cores)
    assert cpu.loader_workers(2, "t", cores=2, reserve=0) == 2
    assert cpu.loader_workers(10, "t", cores=8, reserve=0) == 8


def test_loader_workers_lowering_is_logged_once(caplog):
    with caplog.at_level(logging.INFO, logger="dinov2_hier.cpu"):
        for _ in range(3):
            cpu.loader_workers(7, "once-test", cores=3)
    assert len([r for r in caplog.records if "7 loader workers lowered to 2" in r.getMessage()]) == 1


@pytest.mark.parametrize("cores, idle, workers, expected", [
    (2, 2.0, 0, 1),     # idle 2-core machine: one thread, the other core stays spare
    (4, 4.0, 0, 3),     # probe phase: the idle cores less the spare one
    (4, 3.8, 0, 3),     # a core at least 75% idle counts
    (4, 3.7, 0, 2),
    (4, 2.0, 0, 1),     # two cores taken by other jobs
    (2, 0.0, 0, 1),     # busy machine: one thread, never zero
    (2, 2.0, 1, 1),     # extraction: the worker's core is not the model's
    (16, 16.0, 4, 11),
    (16, 3.0, 4, 1),
    (4, None, 1, 2),    # idle unknown: all cores less the workers and the spare one
    (4, 9.0, 0, 3),     # never more than the cores
])
def test_thread_plan_numbers(cores, idle, workers, expected):
    plan = cpu.thread_plan(workers, cores=cores, idle=idle, env={})
    assert plan.threads == expected and plan.blas is None


def test_thread_plan_respects_the_user():
    assert cpu.thread_plan(0, cores=8, idle=8.0, env={}, blas=1).blas == 1
    pinned = cpu.thread_plan(0, cores=8, idle=0.0, env={"OMP_NUM_THREADS": "3"}, blas=1)
    assert pinned.threads is None and pinned.blas is None and "OMP_NUM_THREADS=3" in pinned.why
    blas_only = cpu.thread_plan(0, cores=8, idle=8.0, env={"OPENBLAS_NUM_THREADS": "2"}, blas=1)
    assert blas_only.threads == 7 and blas_only.blas is None
    explicit = cpu.thread_plan(2, threads=3, cores=8, idle=0.0, env={"OMP_NUM_THREADS": "1"}, blas=1)
    assert (explicit.threads, explicit.blas) == (3, 3)


def test_thread_plan_is_applied_and_restored():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with cpu.ThreadPlan(target, 1, "test").applied():
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with cpu.ThreadPlan(None, None, "user").applied():
        assert torch.get_num_threads() == before


def test_idle_cores_is_a_fraction_of_the_cores():
    idle = cpu.idle_cores(interval=0.05)
    assert idle is None or 0.0 <= idle <= cpu.available_cores()


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    return write_synthetic_dataset(root, 6, Hierarchy.from_json(HIERARCHY), image_size=40, seed=3)


def _paths(manifest) -> list[str]:
    lines = manifest.read_text(encoding="utf-8").splitlines()[1:]
    return [str(manifest.parent / line.split(",")[0]) for line in lines]


def test_eval_loader_on_two_cores_uses_one_worker_without_torch_warning(cells, monkeypatch):
    monkeypatch.setattr(cpu, "available_cores", lambda: 2)
    transform = EvalTransform(32, "pad", [0.5] * 3, [0.25] * 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = eval_image_loader(_paths(cells), transform, batch_size=4, num_workers=4)
        n = sum(len(batch[0]) for batch in loader)
    assert loader.num_workers == 1 and n == 6
    assert not [w for w in caught if "worker processes" in str(w.message)]


# -- item 20b: L-BFGS warnings only for the final fit ------------------------------------
def _hard_blobs(seed: int = 0):
    """3 blobs in 40-D, 30 each: separable, so weakly regularised fits converge slowly."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, 40))
    X = np.concatenate([c + 2.0 * rng.normal(size=(30, 40)) for c in centres]).astype(np.float32)
    return X, np.repeat(["a", "b", "c"], 30)


def test_no_max_iter_warning_when_the_final_fit_converged(caplog):
    X, y = _hard_blobs()
    with caplog.at_level(logging.DEBUG, logger="dinov2_hier.eval"):
        probe = LogRegProbe(backend="torch", device="cpu", max_iter=20, C_grid=[1e-4, 100.0]).fit(X, y)
    # the inner fits at C=100 stop short, the chosen (strong) regularisation converges
    assert probe.chosen_C_ == 1e-4 and probe.converged_
    assert probe.inner_unconverged_C_ == [100.0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("inner CV fits at C=100 reached max_iter=20" in r.getMessage()
               for r in caplog.records if r.levelno == logging.DEBUG)


def test_max_iter_warning_when_the_final_fit_did_not_converge(caplog):
    X, y = _hard_blobs()
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.eval"):
        probe = LogRegProbe(backend="torch", device="cpu", max_iter=3, C=100.0).fit(X, y)
    assert not probe.converged_
    assert "the final fit at the chosen C=100 did not" in caplog.text


# -- item 20c: no progress bar redrawn into a file ----------------------------------------
def test_no_progress_bar_into_a_stream_that_is_not_a_terminal():
    stream = io.StringIO()
    bar = _Progress(100, True, stream=stream)
    for _ in range(10):
        bar.update(10)
    bar.close()
    assert bar.bar is None and stream.getvalue() == ""


def test_progress_bar_on_a_terminal():
    pytest.importorskip("tqdm")

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    bar = _Progress(10, True, stream=stream)
    bar.update(10)
    bar.close()
    assert bar.bar is not None and "10/10" in stream.getvalue()


def test_extraction_writes_no_bar_into_captured_stderr(cells, capfd, caplog):
    backbone = load_eval_backbone("none", arch="vit_tiny", device="cpu")
    with caplog.at_level(logging.INFO, logger="dinov2_hier.eval"):
        extract_features(backbone, _paths(cells), crop_size=28, batch_size=2, num_workers=0, progress=True)
    err = capfd.readouterr().err
    assert "it/s" not in err and "img/s]" not in err and "%|" not in err  # tqdm's bar
    assert "features: 6/6 images" in caplog.text  # the plain progress lines instead


# -- item 20d/e: training's first lines and the last step's images/s ---------------------
def test_training_logs_before_the_first_step(tmp_path, tiny_overrides, caplog):
    cfg = load_config(None, tiny_overrides + ["train.iterations=3", "train.log_every=3", "train.checkpoint_every=3"])
    with caplog.at_level(logging.INFO, logger="dinov2_hier"):
        Trainer(cfg, tmp_path / "run").run()
    messages = [r.getMessage() for r in caplog.records]
    building = next(i for i, m in enumerate(messages) if m.startswith("building the data (synthetic) and the model"))
    starting = next(i for i, m in enumerate(messages) if m.startswith("starting 0 loader worker(s) and the first step"))
    first = next(i for i, m in enumerate(messages) if m.startswith("first step done"))
    logged = next(i for i, m in enumerate(messages) if m.startswith("it 3/3"))
    assert building < starting < first < logged


def test_last_step_images_per_s_with_a_fake_clock(tmp_path, tiny_overrides, monkeypatch):
    """Each step takes 1 s; writing a record takes 0.01 s. The last window (one step of 8
    images, iteration 3 after the line at 2) must read 8 img/s, not 8 / 0.01 s."""
    clock = {"t": 0.0}
    real_step = loop.train_step

    def step_of_one_second(*args, **kwargs):
        out = real_step(*args, **kwargs)
        clock["t"] += 1.0
        return out

    real_append = Trainer._append_metrics

    def slow_append(self, record):
        real_append(self, record)
        clock["t"] += 0.01

    monkeypatch.setattr(loop, "train_step", step_of_one_second)
    monkeypatch.setattr(Trainer, "_append_metrics", slow_append)
    cfg = load_config(None, tiny_overrides + ["train.iterations=3", "train.log_every=2", "train.checkpoint_every=3"])
    trainer = Trainer(cfg, tmp_path / "run")
    monkeypatch.setattr(time, "perf_counter", lambda: clock["t"])  # the loop's clock
    trainer.run()
    monkeypatch.undo()

    records = [json.loads(line) for line in (tmp_path / "run" / loop.METRICS_FILE).read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 3]
    batch = cfg.train.batch_size_per_gpu
    # by hand: steps 1-2 end at 2.0 s (window from 0), step 3 ends at 3.0 s (window from 2.0 s)
    assert records[1]["images_per_s"] == pytest.approx(1 * batch / 1.0)
    assert records[0]["images_per_s"] == pytest.approx(2 * batch / 2.0)
    assert records[1]["eta_s"] == 0
