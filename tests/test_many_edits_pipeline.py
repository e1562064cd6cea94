"""The many-edits study through `run_pipeline` and `benchmarks/many_edits.py` on a tiny GPT-2: too many
edits refused up front, a non-finite edit stops the run with results.json / results.md of what was
measured before it (checked against a clean run of the same config), and --quick's steps fit its val split."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_pipeline_baselines import _config

from salem_jax import pipeline as P
from salem_jax.data.edit_set import load_edit_set
from salem_jax.eval import sequential as S

METHODS = ("ft", "ft_kl", "mend_fixed")  # the stop comes in ft_kl's study: mend_fixed is never run
STEPS = "1,2,4"


def _cfg(tmp_path, methods=METHODS):
    cfg = _config(tmp_path, methods)
    cfg.eval.update(dict(sequential=STEPS, sequential_modes="sequential,batch"))
    return cfg


def _val_fails(work):
    """The val fail rows of the edit set the run wrote, read back from disk, in record order."""
    es = load_edit_set(work / "edit_set")
    return [r for r in es.rows("val") if r["group"] == "fail"]


def _nan_on(monkeypatch, method: str, mode: str, call: int):
    """Make `method`'s many-edits study get an edit function whose `call`-th call in `mode` returns NaN
    weights (the one-at-a-time evaluation's edits are not touched: only the study's edit is wrapped)."""
    orig = S.pipeline_study

    def study(model, edit, val_rows, keep, texts, cfg, name, work, **kw):
        if name != method:
            return orig(model, edit, val_rows, keep, texts, cfg, name, work, **kw)
        calls = {"sequential": 0, "batch": 0}

        def bad(params, rows):
            out = edit(params, rows)
            kind = state["mode"]
            calls[kind] += 1
            if kind == mode and calls[kind] == call:
                return jax.tree.map(lambda x: x * np.nan if x.ndim == 2 else x, out)
            return out

        return orig(model, bad, val_rows, keep, texts, cfg, name, work, **kw)

    state = {"mode": None}
    orig_many = S.many_edits

    def many(*a, mode, **kw):  # which mode the study is in (the edit function is not told)
        state["mode"] = mode
        return orig_many(*a, mode=mode, **kw)

    monkeypatch.setattr(S, "pipeline_study", study)
    monkeypatch.setattr(S, "many_edits", many)


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The same config run to the end, nothing injected: what the stopped runs must have kept. Without
    mend_fixed (which the stopped runs never reach), whose editor training would cost most of the test."""
    tmp = tmp_path_factory.mktemp("clean")
    out = P.run_pipeline(_cfg(tmp, METHODS[:2]), tmp / "work")
    return out, tmp / "work"


def _strip(x):
    """A result without its timings (wall-clock seconds differ between two runs)."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k != "seconds" and not k.endswith("_seconds")}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _same(a, b):
    a, b = _strip(a), _strip(b)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and isinstance(b[k], float):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
        elif isinstance(a[k], dict):
            _same(a[k], b[k])
        elif isinstance(a[k], list) and a[k] and isinstance(a[k][0], dict):
            assert len(a[k]) == len(b[k]), k
            for x, y in zip(a[k], b[k]):
                _same(x, y)
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("mode,call,edit_no", [("sequential", 3, 3), ("batch", 3, 4)])
def test_nan_in_the_pipeline_study_writes_the_results_so_far(clean, tmp_path, monkeypatch, mode, call, edit_no):
    """ft_kl's study gets NaN weights from its 3rd sequential edit (edit 3) or its 3rd batch (T = 4): the run
    stops with NonFiniteEdit naming the edit, and results.json / results.md / many_edits.md hold ft's full
    results, ft_kl's one-at-a-time results and its study up to the edit before, equal to a clean run's."""
    clean_out, clean_work = clean
    cfg = _cfg(tmp_path)
    work = tmp_path / "work"
    _nan_on(monkeypatch, "ft_kl", mode, call)
    with pytest.raises(S.NonFiniteEdit) as e:
        P.run_pipeline(cfg, work)
    fails = _val_fails(work)
    assert len(fails) >= 4
    row = fails[edit_no - 1]["id"]  # the 3rd edit / the last row of the batch of 4
    assert e.value.edit == edit_no and e.value.row_id == row and row in str(e.value)

    written = json.loads((work / "results.json").read_text())
    ref = json.loads((clean_work / "results.json").read_text())
    assert written["stopped"] == dict(method="ft_kl", mode=mode, edit=edit_no, row_id=row, leaves=e.value.leaves,
                                      message=str(e.value), not_run=["mend_fixed"])
    assert "stopped" not in ref and list(written["methods"]) == ["ft", "ft_kl"]
    _same(written["methods"]["ft"], ref["methods"]["ft"])  # the earlier method: all of it
    got, want = written["methods"]["ft_kl"], ref["methods"]["ft_kl"]
    one_at_a_time = [k for k in want if not k.startswith("many_edits")]
    _same({k: got[k] for k in one_at_a_time}, {k: want[k] for k in one_at_a_time})
    kept_T = [1, 2]  # T = 4 is the first score after the bad edit
    want_study = {"sequential": want["many_edits"]["sequential"][:2]} if mode == "sequential" else \
        {"sequential": want["many_edits"]["sequential"], "batch": want["many_edits"]["batch"][:2]}
    assert [r["T"] for r in got["many_edits"][mode]] == kept_T
    _same(got["many_edits"], want_study)
    assert got["many_edits_error"]["mode"] == mode and got["many_edits_error"]["row_id"] == row
    # the study's own file says the same; mend_fixed was never prepared
    study = json.loads((work / "many_edits_ft_kl.json").read_text())
    _same(study["results"], want_study)
    assert not (work / "editor_mend_fixed").exists() and not (work / "many_edits_mend_fixed.json").exists()

    md = (work / "results.md").read_text()
    assert f"STOPPED: ft_kl's many-edits study, mode {mode}, at edit {edit_no} (val fail row '{row}')" in md
    assert "methods not run: mend_fixed" in md and "| ft |" in md and "| ft_kl |" in md
    table = (work / "many_edits.md").read_text()
    assert f"| ft_kl | {mode} | 2 |" in table and f"| ft_kl | {mode} | 4 |" not in table
    assert "| ft | batch | 4 |" in table and (work / "many_edits.png").stat().st_size > 0


def test_pipeline_refuses_more_edits_than_the_val_split_before_saliency(tmp_path, monkeypatch):
    """config.eval.sequential asking for more edits than the val split's fail rows is refused right after the
    edit set is built: the message names the field and both counts (the count read back from the edit set
    on disk), and no saliency, editor, study or results were computed or written."""
    cfg = _cfg(tmp_path)
    cfg.eval.sequential = "1,50"
    work = tmp_path / "work"
    ran = []

    def ran_(step):
        def f(*a, **k):
            ran.append(step)
            raise AssertionError(f"{step} ran before the refusal")
        return f

    monkeypatch.setattr(P, "saliency", ran_("saliency"))
    monkeypatch.setattr(P, "run_method", ran_("method"))
    with pytest.raises(ValueError) as e:
        P.run_pipeline(cfg, work)
    n = len(_val_fails(work))
    assert 0 < n < 50
    assert str(e.value).startswith(f"config.eval.sequential asks for 50 edits but the val split has only {n} val fail "
                                   "rows to edit")
    assert ran == []
    assert sorted(p.name for p in work.iterdir()) == ["edit_set"]  # no profile, editor, many_edits_*, results


def test_quick_steps_fit_the_quick_val_split(monkeypatch):
    """benchmarks/many_edits.py --quick scores after 1, 2 and 4 edits (the default 1,10,50,100 asked for 100
    of at most 60 * 0.2 = 12 val fail rows); an explicit --steps is kept; without --quick the default stays."""
    from benchmarks import many_edits as B

    seen = []

    class Stop(Exception):
        pass

    def fake(cfg, workdir):
        seen.append(cfg)
        raise Stop

    monkeypatch.setattr(P, "run_pipeline", fake)
    for argv, want in ((["--quick"], (1, 2, 4)), (["--quick", "--steps", "1,3"], (1, 3)),
                       ([], (1, 10, 50, 100)), (["--quick", "--config.eval.sequential=2,5"], (2, 5))):
        with pytest.raises(Stop):
            B.main(argv)
        cfg = seen.pop()
        assert S.parse_steps(cfg.eval.sequential) == want, argv
    with pytest.raises(Stop):
        B.main(["--quick"])
    cfg = seen.pop()
    assert (cfg.limit, cfg.val_fraction) == (60, 0.2)
    assert max(S.parse_steps(cfg.eval.sequential)) <= int(60 * 0.2)
