from __future__ import annotations

import json

from bench.train_step import main as bench_main


def test_train_step_benchmark_reports_all_fields(tmp_path, tiny_overrides, capsys):
    out = tmp_path / "bench.json"
    overrides = tiny_overrides + [
        "supervision.hierarchy=hierarchies/synthetic.json", "supervision.losses=[{name: hierce}]",
    ]
    assert bench_main(["--steps", "2", "--warmup", "1", "--json", str(out), *overrides]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("measured: ")
    result = json.loads(out.read_text())
    assert result["batch_size"] == 8 and result["crop"] == 32 and result["supervised"] == ["hierce"]
    assert result["images_per_s"] == 8 / result["step_s_median"]
    assert result["step_s_min"] <= result["step_s_median"] <= result["step_s_max"]
