"""benchmarks/edit_roofline.py on a tiny Llama: the figures it writes agree with each other (the floor
is recomputed here from the probes and XLA's counts) and with XLA's cost analysis of the edit program
lowered by hand."""

from __future__ import annotations

import json

import jax
import pytest

from benchmarks import edit_roofline as R


@pytest.mark.slow  # a whole benchmark run (about 15 s): `make test-slow`
def test_quick_run_writes_consistent_figures(tmp_path):
    out = tmp_path / "r.json"
    assert R.main(["--quick", "--repeats", "1", "--edits", "1,3", "--no-compile-cache", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    m = rep["machine"]
    assert m["read_gb_s"] == pytest.approx(m["param_bytes"] / m["read_s"] / 1e9)
    assert m["matmul_gflop_s"] == pytest.approx(2 * m["matmul_n"] ** 3 / m["matmul_s"] / 1e9)
    (edits,) = rep["layer_sets"].values()
    assert set(edits) == {"edit_1", "edit_3"}
    for e in edits.values():
        t_bytes = e["gbytes"] / m["read_gb_s"]
        t_flops = e["gflop"] / m["matmul_gflop_s"]
        assert e["floor_s"] == pytest.approx(max(t_bytes, t_flops))
        assert e["bound"] == ("memory" if t_bytes >= t_flops else "compute")
        assert e["time_over_floor"] == pytest.approx(e["time_s"] / e["floor_s"])
        # the gradient pass is part of the edit program
        assert 0 < e["capture_gflop"] < e["gflop"]
    # three rows do three times one row's gradient-pass arithmetic, within the head and padding
    assert edits["edit_3"]["capture_gflop"] == pytest.approx(3 * edits["edit_1"]["capture_gflop"], rel=0.25)


def test_bad_arguments_are_refused_before_the_model_loads():
    for argv, match in ((["--edits", "0"], "--edits"), (["--edits", "a"], "--edits"), (["--repeats", "0"], "--repeats")):
        with pytest.raises(SystemExit, match=match):
            R.main(argv)
    with pytest.raises(SystemExit, match="no layers.7"):
        R.main(["--quick", "--layers", "layers.7", "--no-compile-cache"])
