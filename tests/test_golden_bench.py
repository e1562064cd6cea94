"""benchmarks/golden_layers.py `summarize` with a subset of scorers (--scorers): the oracle, the
brute-force fixed layer and each scorer's row against a hand computation on a random table."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import golden_layers as GL


def _table(seed=0, n=6, L=3):
    rng = np.random.default_rng(seed)
    t = rng.integers(0, 4, size=(n, L, 3)) / 3.0  # (edits, layers, rewrite/rephrase/locality)
    extra = [[{"ES": float(rng.random() < 0.5), "PS": float(rng.random()), "NS": float(rng.random())}
              for _ in range(L)] for _ in range(n)]
    return t, extra


def test_summarize_reports_only_the_scorers_run():
    t, extra = _table()
    cand = ["layers.0", "layers.4", "layers.8"]
    res = GL.summarize(t, extra, cand, {}, 60.0, 40.0, 20.0, 2, True, 200)
    assert set(res["ways"]) == {"oracle", "brute_force_fixed"} and res["lga_ip_dropped"] is None
    # hand: per edit, the best layer by (rewrite, rephrase, locality), earliest on ties
    best = [max(range(3), key=lambda j: (tuple(t[i, j]), -j)) for i in range(t.shape[0])]
    assert res["oracle_layers"] == [cand[b] for b in best]
    o = res["ways"]["oracle"]
    assert np.isclose(o["rewrite"], np.mean([t[i, b, 0] for i, b in enumerate(best)]))
    assert np.isclose(o["PS"], np.mean([extra[i][b]["PS"] for i, b in enumerate(best)]))
    f = res["ways"]["brute_force_fixed"]
    j = cand.index(f["layer"])
    assert np.isclose(f["rewrite"], t[:, :, 0].mean(0).max()) and np.isclose(f["rewrite"], t[:, j, 0].mean())
    assert np.isclose(f["cost_s"], 60.0 / (t.shape[0] * 3) * 2 * 3)  # per (edit, layer) x proxy x candidates
    sc = {"lga": ("layers.8", [1.0, 2.0, 3.0], 5.0)}
    res2 = GL.summarize(t, extra, cand, sc, 60.0, 40.0, 20.0, 2, True, 200)
    assert set(res2["ways"]) == {"oracle", "brute_force_fixed", "lga"}
    r = res2["ways"]["lga"]
    assert np.isclose(r["rewrite"], t[:, 2, 0].mean()) and np.isclose(r["NS"], np.mean([e[2]["NS"] for e in extra]))
    assert np.isclose(r["gap_rewrite_vs_oracle"]["mean"], o["rewrite"] - t[:, 2, 0].mean())


def test_cf_layers_prints_means_and_the_paired_difference_on_the_common_edits(capsys):
    """--cf-layers: per layer the mean of each CF metric over the edits, and with two runs the paired
    difference on the first min(N1, N2) edits (hand computation; the bootstrap interval brackets it)."""
    rng = np.random.default_rng(3)
    cand = ["layers.0", "layers.7"]

    def rep(n, prefixes):
        extra = [[{k: float(rng.random()) for k in GL.CF_KEYS} for _ in cand] for _ in range(n)]
        return {"candidates": cand, "args": {"prefixes": prefixes, "v_steps": 20},
                "datasets": {"counterfact": {"n": n, "extra": extra}}}

    a, b = rep(5, "5x5,5x10"), rep(7, "")
    GL.print_cf_layers([a, b], n_boot=500)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("N = 5 edits")
    rows = [ln for ln in lines if ln.startswith("| layers.7")]
    assert len(rows) == 3 and "prefixes none" in rows[1]

    def first(row, col):  # the point estimate of column `col` (0 = ES)
        return float(row.split("|")[3 + col].split("[")[0])

    for q, k in enumerate(GL.CF_KEYS):
        va = np.array([a["datasets"]["counterfact"]["extra"][i][1][k] for i in range(5)])
        vb = np.array([b["datasets"]["counterfact"]["extra"][i][1][k] for i in range(5)])
        assert abs(first(rows[0], q) - va.mean()) <= 0.005 and abs(first(rows[1], q) - vb.mean()) <= 0.005
        assert abs(first(rows[2], q) - (va - vb).mean()) <= 0.005


# --------------------------------------------------------------------------- --resume on a tiny model


def _fake_records(ds, k):
    """k records of data set `ds` in the tiny tokenizer's words (the fields load_edits reads)."""
    from types import SimpleNamespace

    pairs = [("france", "paris", "tokyo"), ("japan", "tokyo", "lima"), ("peru", "lima", "cairo"),
             ("egypt", "cairo", "delhi"), ("india", "delhi", "rome"), ("china", "beijing", "ottawa")]
    return [SimpleNamespace(id=f"{ds}{i}", prompt=f"the capital of {c} is", subject=c, target_new=new,
                            target_true=old, extra={}, rephrases=[f"what city is the capital of {c}"],
                            loc_prompts=["the capital of germany is", "which river lies in egypt"],
                            loc_targets=["berlin", ""])
            for i, (c, old, new) in enumerate(pairs[:k])]


def _tiny_run(monkeypatch, tmp_path):
    """GL.main on a tiny GPT-2 with fake CounterFact / zsRE records and random key-statistics texts;
    returns run(out, *extra_flags) -> the JSON written."""
    import json

    from salem_jax.models import hf
    from salem_jax.testing import random_texts

    model = hf.tiny("gpt2", seed=5)
    monkeypatch.setenv("SALEM_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(GL, "load_model", lambda name: model)
    monkeypatch.setattr(GL, "wikitext_texts", lambda n: random_texts(16))

    # the benchmark's own load_edits (its choice of evaluated and proxy records) on 6 fake records per data set
    monkeypatch.setattr(GL, "find_data_file", lambda fname: fname)
    monkeypatch.setattr(GL, "read_records", lambda path, fmt, limit: _fake_records(fmt, 6)[:limit])

    def run(out, *flags, n=2, scorers="salem"):
        argv = ["--datasets", "counterfact,zsre", "--n", str(n), "--proxy", "2", "--cov-tokens", "400",
                "--prefixes", "1x3,1x4", "--v-steps", "3", "--scorers", scorers, "--boot", "50", "--layers", "h.0,h.1",
                "--no-compile-cache", "--out", str(out), *flags]
        assert GL.main(argv) == 0
        return json.loads(out.read_text())

    return run


def _without_times(rep):
    """The run's results, less its wall times (which differ between any two runs)."""
    out = {"spill": rep.get("spill")}
    for ds, r in rep["datasets"].items():
        out[ds] = {"table": r["table"], "extra": r["extra"], "oracle_layers": r["oracle_layers"], "n": r["n"],
                   "scorers": {k: (v if k == "lga_ip_dropped" else v[:2]) for k, v in r["scorer_choices"].items()},
                   "ways": {w: {k: x for k, x in row.items() if k != "cost_s"} for w, row in r["ways"].items()}}
    return out


def test_resume_equals_an_uninterrupted_run_edit_for_edit(monkeypatch, tmp_path):
    """A run stopped after 2 edits (before the France -> Rome check), resumed and stopped again after
    1 edit (in the second data set), then resumed to the end, writes the same per-edit table,
    CounterFact metrics, oracle, ways and spill check as one uninterrupted run; the resumed runs keep
    the first run's scorer choices (not recomputed) and add to its sweep time."""
    run = _tiny_run(monkeypatch, tmp_path)
    whole = run(tmp_path / "whole.json")
    assert whole["datasets"]["zsre"]["n"] == 2 and "spill" in whole
    out = tmp_path / "parts.json"
    first = run(out, "--stop-after-edits", "2")
    assert list(first["datasets"]) == ["counterfact"] and first["datasets"]["counterfact"]["n"] == 2
    assert "spill" not in first
    second = run(out, "--resume", "--stop-after-edits", "1")
    assert second["datasets"]["zsre"]["n"] == 1 and "spill" in second
    last = run(out, "--resume")
    assert _without_times(last) == _without_times(whole)
    cf1, cf3 = first["datasets"]["counterfact"], last["datasets"]["counterfact"]
    assert cf3["scorer_choices"] == cf1["scorer_choices"]  # seconds included: kept from the file
    assert second["datasets"]["zsre"]["scorer_choices"] == last["datasets"]["zsre"]["scorer_choices"]
    z2, z3 = second["datasets"]["zsre"], last["datasets"]["zsre"]
    assert z3["sweep_seconds"] > z2["sweep_seconds"] and z3["edit_seconds"] > z2["edit_seconds"]
    assert [r["edits_before"] for r in last["resumed"]] == [{"counterfact": 2}, {"counterfact": 2, "zsre": 1}]


def test_resume_refuses_other_settings_or_records(monkeypatch, tmp_path):
    """--resume names the file and the field that differs (settings, candidates, records) and
    refuses a file that does not exist."""
    run = _tiny_run(monkeypatch, tmp_path)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit, match="r.json does not exist"):
        run(out, "--resume", scorers="none")
    run(out, "--stop-after-edits", "1", scorers="none")
    before = out.read_text()
    for flags, field in ((["--v-steps", "4"], "'args.v_steps'"), (["--prefixes", "1x3"], "'args.prefixes'"),
                         (["--layers", "h.1"], "'candidates'"), (["--cov-tokens", "300"], "'args.cov_tokens'")):
        with pytest.raises(SystemExit, match=f"r.json: field {field}"):
            run(out, "--resume", *flags, scorers="none")
    with pytest.raises(SystemExit, match=f"r.json: field 'args.scorers'"):
        run(out, "--resume")
    # a larger --n without --proxy-at moves the proxy set (records 3, 4 instead of 2, 3): refused, with the hint
    with pytest.raises(SystemExit, match=r"r.json: field 'datasets.counterfact.proxy_ids'.*give --proxy-at 2"):
        run(out, "--resume", n=3, scorers="none")
    # a smaller --n than the file's records, or another proxy position: the evaluated records differ
    with pytest.raises(SystemExit, match=r"r.json: field 'datasets.counterfact.record_ids'"):
        run(out, "--resume", "--proxy-at", "0", n=2, scorers="none")
    assert out.read_text() == before  # nothing lost


@pytest.mark.slow
def test_resume_extends_a_finished_run_to_a_larger_n(monkeypatch, tmp_path):
    """A finished --n 2 run, resumed with --n 4 --proxy-at 2, writes the same per-edit tables, metrics,
    oracle, ways and scorer choices as one uninterrupted --n 4 --proxy-at 2 run; its first 2 edits are
    the --n 2 run's; the records (by hand: usable records 0-5, proxy 2 and 3) keep the proxy set out of
    the evaluated edits. Then an extension stopped after its first new edit and resumed again."""
    run = _tiny_run(monkeypatch, tmp_path)
    whole = run(tmp_path / "whole.json", "--proxy-at", "2", n=4)
    for ds in ("counterfact", "zsre"):
        r = whole["datasets"][ds]
        assert r["record_ids"] == [f"{ds}{i}" for i in (0, 1, 4, 5)] and r["proxy_ids"] == [f"{ds}2", f"{ds}3"]
        assert r["n"] == 4
    out = tmp_path / "ext.json"
    small = run(out, n=2)
    assert small["datasets"]["zsre"]["proxy_ids"] == ["zsre2", "zsre3"] and small["datasets"]["zsre"]["n"] == 2
    part = run(out, "--resume", "--proxy-at", "2", "--stop-after-edits", "1", n=4)
    assert part["datasets"]["counterfact"]["n"] == 3 and part["datasets"]["zsre"]["n"] == 2
    ext = run(out, "--resume", "--proxy-at", "2", n=4)
    w, e = _without_times(whole), _without_times(ext)
    assert e.pop("spill") == small["spill"]  # France -> Rome: checked once, by the first run (its best layer)
    w.pop("spill")
    assert e == w
    for ds in ("counterfact", "zsre"):
        a, b = small["datasets"][ds], ext["datasets"][ds]
        assert b["table"][:2] == a["table"] and b["extra"][:2] == a["extra"]
        assert b["scorer_choices"] == a["scorer_choices"]  # seconds included: kept from the first run
        assert b["sweep_seconds"] > a["sweep_seconds"] and b["n_planned"] == 4
    assert [r["edits_before"] for r in ext["resumed"]] == [{"counterfact": 2, "zsre": 2}, {"counterfact": 3, "zsre": 2}]


def test_power_uses_the_scorer_nearest_the_oracle_and_its_per_edit_gaps(capsys, monkeypatch):
    """--power: per data set, the scorer with the smallest mean rewrite gap to the oracle, its gaps taken
    from the run's table (hand computation here), handed to `claim_power` with the N and bound asked."""
    t, extra = _table(seed=3, n=8)
    cand = ["layers.0", "layers.4", "layers.8"]
    sc = {"salem": ("layers.0", [3.0, 2.0, 1.0], 5.0), "lga": ("layers.8", [1.0, 2.0, 3.0], 5.0)}
    res = GL.summarize(t, extra, cand, sc, 60.0, 40.0, 20.0, 2, True, 200)
    best = [max(range(3), key=lambda j: (tuple(t[i, j]), -j)) for i in range(t.shape[0])]
    oracle = np.array([t[i, b, 0] for i, b in enumerate(best)])
    gaps = {j: oracle - t[:, j, 0] for j in (0, 2)}
    nearest = 0 if gaps[0].mean() <= gaps[2].mean() else 2
    assert gaps[0].mean() != gaps[2].mean()  # the table must tell the two scorers apart
    seen = {}

    def fake_power(g, ns, *, bound):
        seen.update(gaps=np.asarray(g), ns=list(ns), bound=bound)
        return {n: 0.5 for n in ns}

    monkeypatch.setattr(GL, "claim_power", fake_power)
    GL.print_power({"candidates": cand, "datasets": {"counterfact": res}}, [10, 40], 0.03)
    out = capsys.readouterr().out
    np.testing.assert_allclose(seen["gaps"], gaps[nearest])
    assert seen["ns"] == [10, 40] and seen["bound"] == 0.03
    assert f"({cand[nearest]})" in out and f"{gaps[nearest].mean():+.3f}" in out and "N = 40: 0.50" in out
