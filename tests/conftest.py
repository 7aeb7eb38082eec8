"""Shared fixtures: tiny configurations that train in seconds on 2 CPU cores."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# A tiny student on 32 px synthetic cells: 4 x 4 patches of 8 px.
TINY_OVERRIDES = [
    "student.arch=vit_tiny",
    "student.patch_size=8",
    "student.drop_path_rate=0.0",
    "crops.global_crops_size=32",
    "data.synthetic.image_size=40",
    "data.synthetic.num_images=256",
    "data.num_workers=0",
    "dino.head_n_prototypes=256",
    "dino.head_hidden_dim=128",
    "dino.head_bottleneck_dim=64",
    "ibot.head_n_prototypes=256",
    "ibot.head_hidden_dim=128",
    "ibot.head_bottleneck_dim=64",
    "train.batch_size_per_gpu=8",
    "train.iterations=6",
    "train.epoch_length=2",
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=0",
    "teacher.warmup_teacher_temp_epochs=1",
    "optim.warmup_epochs=1",
    "optim.freeze_last_layer_epochs=0.5",
]


@pytest.fixture(scope="session", autouse=True)
def _torch_threads_fixed_for_the_session():
    """One torch intra-op thread for every test, whatever ran before it. Float reductions
    depend on the thread count, and a few tests train a tiny model for tens of steps, where
    that difference grows (``test_hierce_training_supervised_loss_falls`` ended at 0.655 of
    its first loss with one thread and 0.743 with two). Before, the count was whatever an
    earlier test had left (``test_bench``'s probe test and ``test_submit``'s
    ``single_process`` fixture set 1 and kept it): 2 on a 2-core machine for a test run
    alone, 1 in a full run. One thread is also the faster choice for these tiny tensors on
    busy CI cores. Subprocesses start with torch's default; the ranks of the
    multi-process tests set their own."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny tensors: OpenMP spin-waiting on busy CI cores
    costs more than the second thread gains."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_overrides() -> list[str]:
    return list(TINY_OVERRIDES)


def real_data_dir() -> Path | None:
    """``$DINOV2_HIER_TEST_DATA`` (a folder with bccd/ and pbc_dev/), None when unset; a set
    path without them stops the session (:func:`pytest_configure`)."""
    root = os.environ.get("DINOV2_HIER_TEST_DATA")
    return Path(root) if root else None


def pytest_configure(config):
    """A set but wrong ``DINOV2_HIER_TEST_DATA`` is an error, not a silent skip of the
    real-data tests."""
    root = os.environ.get("DINOV2_HIER_TEST_DATA")
    if root and not all((Path(root) / sub).is_dir() for sub in ("bccd", "pbc_dev")):
        raise pytest.UsageError(
            f"DINOV2_HIER_TEST_DATA={root} has no bccd/ and pbc_dev/ folders; point it at the real images "
            "or unset it (the real-data tests are then skipped)"
        )


def pytest_collection_modifyitems(config, items):
    """Tests marked ``slow`` run only with ``DINOV2_HIER_SLOW=1``; ``.ci/run`` sets it, so
    CI runs them. They are the multi-process, subprocess, compile-tracing, long-training
    and large-model tests (half the suite's time on 2 cores); each area keeps a fast test
    in the default run."""
    if os.environ.get("DINOV2_HIER_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set DINOV2_HIER_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def counting_backend(graphs: list):
    """A ``torch.compile`` backend that appends each graph's example inputs to ``graphs`` and
    runs the graph eagerly: tests count the graphs a step traces into."""

    def backend(graph_module, example_inputs):
        graphs.append(example_inputs)
        return graph_module.forward

    return backend
