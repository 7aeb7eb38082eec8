"""``python -m eval.extract``: features of 200 synthetic images to .npz / Parquet, resumable
(issue 23, part 2), through the evaluation's own extraction loop."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_hier.data import EvalTransform, load_image, read_manifest, write_synthetic_dataset
from dinov2_hier.hierarchy import Hierarchy
from dinov2_hier.models.spec import BackboneSpec
from dinov2_hier.paths import PROJECT_ROOT
from eval.extract import extract_to_file, main
from eval.features import extract_features, load_eval_backbone

HIERARCHY = PROJECT_ROOT / "hierarchies" / "synthetic.json"
N = 200
EMPTY_ROW = 7  # a zero-byte file: unreadable
UNLABELLED = (3, 150)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A vit_tiny/8 teacher file at 32 px (random weights) and a 200-row manifest: 199
    synthetic 40 px cells, one empty file, two rows without a label."""
    root = tmp_path_factory.mktemp("extract")
    spec = BackboneSpec("vit_tiny", 8, 32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = spec.build()
        for p in model.parameters():  # LayerScale 1e-5 would leave the blocks all but unused
            if p.ndim == 1 and p.shape[0] == model.embed_dim:
                p.data.normal_(0, 0.5)
    teacher = root / "teacher_backbone.pt"
    torch.save({"model": model.state_dict(), "meta": {**spec.to_metadata(), "iteration": 7}}, teacher)
    generated = write_synthetic_dataset(root / "cells", N, Hierarchy.from_json(HIERARCHY), image_size=40, seed=4)
    lines = generated.read_text(encoding="utf-8").splitlines()
    header, rows = lines[0], lines[1:N + 1]
    (root / "cells" / "images" / "empty.png").write_bytes(b"")
    cells = rows[EMPTY_ROW].split(",")
    cells[0] = "images/empty.png"
    rows[EMPTY_ROW] = ",".join(cells)
    label = header.split(",").index("label")
    for i in UNLABELLED:
        cells = rows[i].split(",")
        cells[label] = ""
        rows[i] = ",".join(cells)
    manifest = root / "cells" / "manifest.csv"
    manifest.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return {"root": root, "teacher": teacher, "manifest": manifest, "records": read_manifest(manifest)}


def _args(setup, output, *extra):
    return ["--ckpt", str(setup["teacher"]), "--data", str(setup["manifest"]), "--output", str(output),
            "--device", "cpu", "--num-workers", "0", "--no-progress", "--batch-size", "16", "--chunk-size", "48",
            *extra]


class _Killed(Exception):
    """Stands for a kill: raised after the k-th chunk is stored."""


def _load(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def test_npz_layout_and_values_equal_the_eval_path(setup, tmp_path, capsys):
    out = tmp_path / "feats.npz"
    assert main(_args(setup, out, "--patch-tokens")) == 0
    assert f"{out}: 200 images (1 unreadable)" in capsys.readouterr().out
    got = _load(out)
    assert sorted(got) == ["cls", "labels", "meta", "ok", "patch_tokens", "paths", "pooled"]
    dim, n_patches = 192, (32 // 8) ** 2
    assert got["cls"].shape == (N, dim) and got["pooled"].shape == (N, dim)
    assert got["patch_tokens"].shape == (N, n_patches, dim)
    assert {got[k].dtype for k in ("cls", "pooled", "patch_tokens")} == {np.dtype(np.float32)}
    records = setup["records"]
    assert got["paths"].tolist() == [r.path for r in records]  # the manifest's order
    assert got["labels"].tolist() == ["" if r.label is None else r.label for r in records]
    assert [i for i, lab in enumerate(got["labels"]) if lab == ""] == list(UNLABELLED)
    assert got["ok"].tolist() == [i != EMPTY_ROW for i in range(N)]
    assert not got["cls"][EMPTY_ROW].any() and not got["patch_tokens"][EMPTY_ROW].any()
    meta = json.loads(str(got["meta"]))
    assert meta["n_images"] == N and meta["n_unreadable"] == 1 and meta["embed_dim"] == dim
    assert meta["num_patches"] == n_patches and meta["iteration"] == 7 and meta["precision"] == "fp32"

    # CLS: bit for bit what the evaluation caches for this checkpoint (same batch size)
    backbone = load_eval_backbone(setup["teacher"])
    cached = extract_features(backbone, got["paths"].tolist(), batch_size=16, cache_dir=tmp_path / "cache",
                              progress=False)
    with np.load(cached.cache_path) as cache:
        assert np.array_equal(cache["features"], got["cls"]) and np.array_equal(cache["ok"], got["ok"])
    assert got["cls"][got["ok"]].std(0).mean() > 1e-3  # images differ

    # pooled: the mean of the model's patch tokens, computed directly on one image
    i = 123
    transform = EvalTransform(32, "pad", backbone.meta["mean"], backbone.meta["std"])
    with torch.no_grad():
        direct = backbone.model(transform(load_image(records[i].path))[None])
    np.testing.assert_allclose(got["pooled"][i], direct["x_norm_patchtokens"][0].mean(0).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["cls"][i], direct["x_norm_clstoken"][0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got["pooled"], got["patch_tokens"].mean(1), rtol=0, atol=1e-6)
    assert not (tmp_path / "feats.npz.parts").exists()


def test_killed_run_resumes_to_the_same_file(setup, tmp_path, capsys):
    whole = tmp_path / "whole.npz"
    assert main(_args(setup, whole, "--patch-tokens")) == 0

    out = tmp_path / "resumed.npz"
    stored = []

    def kill_after_two(i, n_chunks):  # the job dies after its second chunk is stored
        stored.append(i)
        if len(stored) == 2:
            raise _Killed

    with pytest.raises(_Killed):
        extract_to_file(str(setup["teacher"]), str(setup["manifest"]), out, patch_tokens=True, batch_size=16,
                        chunk_size=48, num_workers=0, device="cpu", progress=False, on_chunk=kill_after_two)
    parts = tmp_path / "resumed.npz.parts"
    assert not out.exists() and sorted(p.name for p in parts.iterdir()) == [
        "chunk_000000.npz", "chunk_000001.npz", "job.json"]

    capsys.readouterr()
    assert main(_args(setup, out, "--patch-tokens")) == 0  # the same command again
    err = capsys.readouterr().err
    assert "2 of 5 chunks (96 of 200 images) already extracted" in err
    assert "200 images (104 extracted now" in err  # only the last three chunks were computed
    a, b = _load(whole), _load(out)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert whole.read_bytes() == out.read_bytes()
    assert not parts.exists()


def test_chunks_of_another_job_are_discarded(setup, tmp_path, caplog):
    out = tmp_path / "f.npz"

    def stop(i, n):
        raise _Killed

    with pytest.raises(_Killed):
        extract_to_file(str(setup["teacher"]), str(setup["manifest"]), out, batch_size=16, chunk_size=64,
                        num_workers=0, device="cpu", progress=False, on_chunk=stop)
    done = []
    with caplog.at_level(logging.WARNING, logger="dinov2_hier.eval"):  # chunk size 48 now: another job
        extract_to_file(str(setup["teacher"]), str(setup["manifest"]), out, batch_size=16, chunk_size=48,
                        num_workers=0, device="cpu", progress=False, on_chunk=lambda i, n: done.append(i))
    assert done == [0, 1, 2, 3, 4] and "chunks of another extraction" in caplog.text
    assert _load(out)["cls"].shape == (N, 192)


def test_parquet_without_pyarrow_is_one_line_exit_2(setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # an import of it fails, installed or not
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert main(_args(setup, tmp_path / "f.parquet")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pip install pyarrow" in err[0], err
    assert not (tmp_path / "f.parquet.parts").exists()


def test_parquet_equals_npz(setup, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    extract_to_file(str(setup["teacher"]), str(setup["manifest"]), tmp_path / "f.parquet", patch_tokens=True,
                    batch_size=16, chunk_size=48, num_workers=0, device="cpu", progress=False)
    extract_to_file(str(setup["teacher"]), str(setup["manifest"]), tmp_path / "f.npz", patch_tokens=True,
                    batch_size=16, chunk_size=48, num_workers=0, device="cpu", progress=False)
    table, ref = pq.read_table(tmp_path / "f.parquet"), _load(tmp_path / "f.npz")
    assert table.column_names == ["path", "label", "ok", "cls", "pooled", "patch_tokens"]
    assert table.column("path").to_pylist() == ref["paths"].tolist()
    assert table.column("label").to_pylist() == [x or None for x in ref["labels"].tolist()]
    for name in ("cls", "pooled", "patch_tokens"):
        values = table.column(name).combine_chunks().flatten().to_numpy()
        assert np.array_equal(values.reshape(ref[name].shape), ref[name]), name
    assert json.loads(table.schema.metadata[b"dinov2_hier"])["n_images"] == N


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as stop:  # argparse
        return stop.code


@pytest.mark.parametrize("extra, named", [
    (["--device", "gpu"], "'gpu'"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--chunk-size", "-3"], "--chunk-size must be at least 1, got -3"),
    (["--resize-mode", "stretch"], "'stretch'"),
    (["--crop-size", "30"], "crop size 30 px"),
    (["--ckpt", "absent.pt"], "absent.pt"),
])
def test_bad_flags_are_one_line_exit_2(setup, tmp_path, capsys, extra, named):
    assert _exit_code(_args(setup, tmp_path / "f.npz") + extra) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if " INFO " not in line]  # a started job's log lines
    assert len(err) == 1 and err[0].startswith("error: ") and named in err[0], err


def test_unknown_output_suffix_exits_2(setup, tmp_path, capsys):
    assert main(_args(setup, tmp_path / "f.csv")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "f.csv" in err[0] and ".npz" in err[0], err


@pytest.mark.slow
def test_sigkilled_subprocess_resumes(setup, tmp_path):
    """A real kill (SIGKILL once the third chunk is stored), then the same command."""
    import time

    def command(output):
        return [sys.executable, "-m", "eval.extract", *_args(setup, output, "--chunk-size", "16")]

    out, whole = tmp_path / "k.npz", tmp_path / "w.npz"
    proc = subprocess.Popen(command(out), cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "k.npz.parts"
    try:
        deadline = time.monotonic() + 120
        while not (parts / "chunk_000002.npz").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "finished before it could be killed"
            time.sleep(0.005)
        proc.kill()
    finally:
        proc.wait()
    assert not out.exists()
    subprocess.run(command(out), cwd=PROJECT_ROOT, check=True, capture_output=True)
    subprocess.run(command(whole), cwd=PROJECT_ROOT, check=True, capture_output=True)
    assert out.read_bytes() == whole.read_bytes()


def test_folder_of_images_without_classes(setup, tmp_path):
    """A flat folder (no class sub-folders): every image, in name order, unlabelled."""
    import shutil

    folder = tmp_path / "loose"
    folder.mkdir()
    for r in setup["records"][:5]:
        shutil.copy(r.path, folder / f"x_{Path(r.path).name}")
    out = tmp_path / "loose.npz"
    extract_to_file(str(setup["teacher"]), str(folder), out, batch_size=4, num_workers=0, device="cpu",
                    progress=False)
    got = _load(out)
    assert got["paths"].tolist() == sorted(str(p) for p in folder.iterdir())
    assert got["labels"].tolist() == [""] * 5 and got["ok"].all() and got["cls"].shape == (5, 192)


def test_chunks_cut_across_host_copies(setup, tmp_path, monkeypatch):
    """Blocks of the loop (HOST_COPY_EVERY batches) that straddle chunk boundaries, or are
    smaller or larger than a chunk, give the same file."""
    import eval.extraction as extraction

    manifest = setup["manifest"].parent / "sixty.csv"  # beside the images: the paths are relative
    manifest.write_text("\n".join(setup["manifest"].read_text(encoding="utf-8").splitlines()[:61]) + "\n")
    files = []
    for every in (1, 2, 16):  # blocks of 8, 16 and all 60 rows; chunks of 24
        monkeypatch.setattr(extraction, "HOST_COPY_EVERY", every)
        files.append(tmp_path / f"every{every}.npz")
        extract_to_file(str(setup["teacher"]), str(manifest), files[-1], batch_size=8, chunk_size=24,
                        num_workers=0, device="cpu", progress=False)
    assert files[0].read_bytes() == files[1].read_bytes() == files[2].read_bytes()
    assert _load(files[0])["cls"].shape == (60, 192) and not _load(files[0])["ok"][EMPTY_ROW]
