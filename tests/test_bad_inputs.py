"""Bad input to the command-line faces (issue 19, items 14 and 15): one line naming the key,
file or value, exit code 2, no traceback -- and, for a bad config value, nothing created and
no model built (the resolved config is validated first: dinov2_hier.config_schema)."""
from __future__ import annotations

import builtins
import errno
import io
import os
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from dinov2_hier.config import load_config
from dinov2_hier.paths import PROJECT_ROOT

from .conftest import TINY_OVERRIDES

SYNTHETIC = str(PROJECT_ROOT / "hierarchies" / "synthetic.json")
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")  # setup_logging's lines, not the error


def _train(out, *args: str) -> int:
    from dinov2_hier.train.__main__ import main as train_main

    return train_main(["--output-dir", str(out), *TINY_OVERRIDES, *args])


def _one_error_line(capsys) -> str:
    """The single non-log line on stderr (an ``error: ...`` line), asserting no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if not LOG_LINE.match(line)]
    assert len(lines) == 1, err
    return lines[0]


# -- item 14: config values of the wrong type or out of range ---------------------------------
BAD_VALUES = [
    ("optim.base_lr=abc", "optim.base_lr must be a number >= 0, got 'abc'"),
    ("optim.base_lr=.nan", "optim.base_lr must be a number >= 0, got nan"),
    ("train.iterations=abc", "train.iterations must be an integer >= 1, got 'abc'"),
    ("train.iterations=0", "train.iterations must be an integer >= 1, got 0"),
    ("train.iterations=-5", "train.iterations must be an integer >= 1, got -5"),
    ("train.batch_size_per_gpu=-4", "train.batch_size_per_gpu must be an integer >= 1, got -4"),
    ("train.batch_size_per_gpu=0", "train.batch_size_per_gpu must be an integer >= 1, got 0"),
    ("train.batch_size_per_gpu=8.5", "train.batch_size_per_gpu must be an integer >= 1, got 8.5"),
    ("train.batch_size_per_gpu=eight", "train.batch_size_per_gpu must be an integer >= 1, got 'eight'"),
    ("train.checkpoint_every=0", "train.checkpoint_every must be an integer >= 1, got 0"),
    ("train.log_every=0", "train.log_every must be an integer >= 1, got 0"),
    ("train.epoch_length=0", "train.epoch_length must be an integer >= 1, got 0"),
    ("student.arch=vit_nope", "student.arch must be one of vit_tiny, vit_small, vit_base, vit_large, vit_giant2, "
                              "got 'vit_nope'; did you mean 'vit_tiny'?"),
    ("dino.student_temp=0", "dino.student_temp must be a number > 0, got 0"),
    ("ibot.sk_iterations=0", "ibot.sk_iterations must be an integer >= 1, got 0"),
    ("seed=-1", "seed must be an integer >= 0, got -1"),
    ("data.max_unreadable_fraction=2", "data.max_unreadable_fraction must be a number in [0, 1], got 2"),
    ("dino.centering=sinkhorn", "dino.centering must be one of sinkhorn_knopp, softmax, got 'sinkhorn'; "
                                "did you mean 'sinkhorn_knopp'?"),
    ("optim.clip_grad_mode=per-module", "optim.clip_grad_mode must be one of per_module, global, got 'per-module'; "
                                        "did you mean 'per_module'?"),
    ("ibot.mask_ratio_min_max=[0.5,0.1]", "ibot.mask_ratio_min_max must be a [min, max] pair of numbers in [0, 1] "
                                          "with min <= max, got [0.5, 0.1]"),
    ("crops.mean=[0.5]", "crops.mean must be a list of 3 numbers, got [0.5]"),
    ("optim.fused=sometimes", "optim.fused must be true, false or auto, got 'sometimes'"),
    ("supervision.crops=masked", "supervision.crops must be one of all, unmasked, got 'masked'; "
                                 "did you mean 'unmasked'?"),
    ("student.layerscale=0", "student.layerscale must be a number > 0 or null, got 0"),
    ("data.train=[1]", "data.train must be a list of strings or a string, got [1]"),
    # Unknown keys name the closest known one.
    ("train.iteratons=5", "command line: unknown config key 'train.iteratons'; did you mean 'train.iterations'?"),
    ("optim.student_temp=0.1", "command line: unknown config key 'optim.student_temp'; "
                               "did you mean 'dino.student_temp' or 'ibot.student_temp'?"),
    # A typo in the section of the mandatory data.train (its default is ???) is named too.
    ("data.batch_size=16", "command line: unknown config key 'data.batch_size'; "
                           "did you mean 'train.batch_size_per_gpu'?"),
]


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_config_value_exits_2_in_one_line_before_anything_is_created(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert _train(out, override) == 2
    assert _one_error_line(capsys) == f"error: {message}"
    assert not out.exists()  # refused before the run directory (or any model) was made


def test_a_bad_value_in_a_config_file_names_the_key_and_a_typo_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  base_lr: lots\n")
    assert _train(tmp_path / "run", "--config", str(bad)) == 2
    assert _one_error_line(capsys) == "error: optim.base_lr must be a number >= 0, got 'lots'"
    typo = tmp_path / "typo.yaml"
    typo.write_text("optim:\n  bse_lr: 0.1\n")
    assert _train(tmp_path / "run", "--config", str(typo)) == 2
    assert _one_error_line(capsys) == (f"error: {typo.resolve()}: unknown config key 'optim.bse_lr'; "
                                       "did you mean 'optim.base_lr'?")


@pytest.mark.slow
def test_the_real_process_exits_2_with_one_line(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "dinov2_hier.train", "--output-dir", str(out), "train.log_every=0"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "error: train.log_every must be an integer >= 1, got 0\n"
    assert not out.exists()


def test_numeric_strings_become_numbers(tmp_path):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string: a number key takes it as the number,
    an integer key an integral one; the saved config records numbers."""
    layer = tmp_path / "lr.yaml"
    layer.write_text("optim:\n  min_lr: 1e-7\n")
    cfg = load_config(layer, ["optim.base_lr=1e-3", "train.iterations=1e5", "optim.betas=[0.9, 9.99e-1]"])
    assert cfg.optim.base_lr == 0.001 and isinstance(cfg.optim.base_lr, float)
    assert cfg.optim.min_lr == 1e-7
    assert cfg.train.iterations == 100000 and isinstance(cfg.train.iterations, int)
    assert list(cfg.optim.betas) == [0.9, 0.999]
    assert "base_lr: 0.001\n" in OmegaConf.to_yaml(cfg)
    # Integers stay integers where a number is asked for; fractional epochs are numbers.
    cfg = load_config(None, ["optim.clip_grad=1", "optim.freeze_last_layer_epochs=0.5", "data.train=cells.csv"])
    assert cfg.optim.clip_grad == 1 and cfg.optim.freeze_last_layer_epochs == 0.5 and cfg.data.train == "cells.csv"


def test_every_shipped_config_passes_the_schema():
    files = sorted((PROJECT_ROOT / "configs").rglob("*.yaml"))
    for f in files:
        if f.parent.name == "finetune":  # eval.finetune option files: tests/test_config.py
            continue
        weights = ["student.pretrained_weights=DinoBloom.pth"] if f.parent.name == "paper" else []
        load_config(None if f.name == "default.yaml" else f, ["data.train=[synthetic]"] + weights)


def test_the_schema_tables_name_real_keys_and_the_codes_own_choices():
    """Every key of RULES/TYPES is a default key, every null default has a TYPES entry, and
    the enumerations equal the tuples the building code checks against."""
    from dinov2_hier.config_schema import RULES, TYPES, leaf_keys
    from dinov2_hier.data import PHOTOMETRIC_MODES
    from dinov2_hier.data.samplers import BALANCE_MODES
    from dinov2_hier.losses.ssl import _CENTERINGS
    from dinov2_hier.models.vision_transformer import (
        _FFN_LAYERS, DROP_PATH_MODES, DROP_PATH_SCHEDULES, RESIDUAL_STREAMS, _factories,
    )
    from dinov2_hier.train.meta_arch import SUPERVISED_CROPS
    from dinov2_hier.train.parallel import _DTYPES, COMPILE_MODES, PARALLEL_MODES

    defaults = dict(leaf_keys(OmegaConf.load(PROJECT_ROOT / "configs" / "default.yaml")))
    assert set(RULES) - set(defaults) == set() and set(TYPES) - set(defaults) == set()
    assert {k for k, v in defaults.items() if v is None} <= set(TYPES)
    code = {
        "student.arch": tuple(_factories()), "student.ffn_layer": tuple(_FFN_LAYERS),
        "student.drop_path_mode": DROP_PATH_MODES, "student.drop_path_schedule": DROP_PATH_SCHEDULES,
        "compute.residual_stream": RESIDUAL_STREAMS, "compute.compile": COMPILE_MODES,
        "compute.parallel": PARALLEL_MODES, "crops.photometric": PHOTOMETRIC_MODES,
        "dino.centering": _CENTERINGS, "ibot.centering": _CENTERINGS, "supervision.balance": BALANCE_MODES,
        "supervision.crops": SUPERVISED_CROPS,
    }
    for key, choices in code.items():
        assert set(RULES[key].choices) == set(choices), key
    for key in ("backbone_param_dtype", "heads_param_dtype", "reduce_dtype"):
        assert set(RULES[f"compute.fsdp.{key}"].choices) == set(_DTYPES)


# -- item 15: files and directories --------------------------------------------------------------
def test_a_header_only_training_manifest_names_the_file(tmp_path, capsys):
    manifest = tmp_path / "cells.csv"
    manifest.write_text("path,label\n")
    assert _train(tmp_path / "run", f"data.train=[{manifest}]") == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {manifest.resolve()}: no rows") and "at least one image" in line


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory nothing can be created in. Root ignores permission bits, so for root the
    calls that create files or folders below it fail as the kernel fails them for others."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        inside = str(folder) + os.sep

        def denied(path) -> bool:
            return os.path.abspath(os.fspath(path)).startswith(inside)

        def refuse(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

        real_os_open, real_mkdir, real_open = os.open, os.mkdir, builtins.open
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT

        def os_open(path, flags, *args, **kwargs):
            return refuse(path) if flags & writes and denied(path) else real_os_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            return refuse(path) if denied(path) else real_mkdir(path, *args, **kwargs)

        def open_(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and set(mode) & set("wax+") and denied(file):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
    yield folder
    folder.chmod(0o755)


def test_a_read_only_output_directory_names_it(read_only_dir, capsys):
    assert _train(read_only_dir) == 2
    assert _one_error_line(capsys) == f"error: --output-dir {read_only_dir} is not writable: Permission denied"


def test_an_output_directory_that_cannot_be_created_names_it(tmp_path, capsys):
    from eval.knn import main as knn_main

    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"
    assert _train(out) == 2
    assert _one_error_line(capsys) == f"error: --output-dir {out}: cannot create the directory: Not a directory"
    assert _train(tmp_path / "a_file") == 2
    assert _one_error_line(capsys) == f"error: --output-dir {tmp_path / 'a_file'} exists and is not a directory"
    # The evaluation faces share the check.
    assert knn_main(["--ckpt", "none", "--arch", "vit_tiny", "--data", "x.csv", "--output-dir", str(out)]) == 2
    assert _one_error_line(capsys) == f"error: --output-dir {out}: cannot create the directory: Not a directory"


def _nested_tree(path, depth: int):
    """A nested-form hierarchy file with a chain of ``depth`` internal nodes above one leaf
    (written as text: json.dumps itself recurses per level)."""
    text = ('{"name": "deep", "root": ' + "".join(f'{{"id": "n{i}", "children": [' for i in range(depth))
            + '{"id": "leaf"}' + "]}" * depth + "}")
    path.write_text(text)
    return path


@pytest.mark.parametrize("depth, message", [
    (101, "the tree is deeper than 100 levels (node 'leaf' is at depth 101)"),
    (600, "JSON nested too deeply to read (a hierarchy may be at most 100 levels deep)"),
], ids=["deeper-than-the-limit", "deeper-than-json-can-read"])
def test_a_hierarchy_deeper_than_the_limit_names_the_file(tmp_path, capsys, depth, message):
    tree = _nested_tree(tmp_path / "deep.json", depth)
    rc = _train(tmp_path / "run", f"supervision.hierarchy={tree}", "supervision.losses=[{name: hierce}]")
    assert rc == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: {tree.resolve()}") and line.endswith(message)


def test_a_synthetic_tree_without_cell_attributes_names_the_node(tmp_path, capsys):
    """``data.synthetic.hierarchy`` pointing at a tree whose leaves lack the generator's
    ``meta`` is bad input (a traceback before the error layer, issue 20)."""
    tree = tmp_path / "plain.json"
    tree.write_text('{"name": "plain", "root": {"id": "root", "children": [{"id": "A"}, {"id": "B"}]}}')
    assert _train(tmp_path / "run", f"data.synthetic.hierarchy={tree}") == 2
    assert _one_error_line(capsys) == "error: node 'A': meta is missing key 'nucleus'"


@pytest.mark.slow
def test_a_truncated_feature_cache_is_extracted_again(tmp_path, capsys):
    """A cache file cut short (a kill or a full disk while writing or copying it) is a broken
    zip: one warning naming it, the features are extracted again and the run succeeds."""
    from dinov2_hier.data import write_synthetic_dataset
    from dinov2_hier.hierarchy import Hierarchy
    from eval.knn import main as knn_main

    tree = Hierarchy.from_json(SYNTHETIC)
    data = write_synthetic_dataset(tmp_path / "cells", 2 * tree.num_leaves, tree, image_size=40, seed=1)
    cache = tmp_path / "cache"
    args = ["--ckpt", "none", "--arch", "vit_tiny", "--crop-size", "28", "--data", str(data), "--folds", "2",
            "--k", "1", "--num-workers", "0", "--no-progress", "--cache-dir", str(cache)]
    assert knn_main([*args, "--output-dir", str(tmp_path / "first")]) == 0, capsys.readouterr().err
    (npz,) = cache.glob("*.npz")
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    capsys.readouterr()
    assert knn_main([*args, "--output-dir", str(tmp_path / "second")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "feature cache" in line]
    assert len(warnings) == 1 and f"ignoring unusable feature cache {npz}" in warnings[0], err
    assert warnings[0].endswith("extracting again")
    assert knn_main([*args, "--output-dir", str(tmp_path / "third")]) == 0  # the rewritten cache loads
    assert f"loaded from {npz}" in capsys.readouterr().err
