"""benchmarks/golden_layers.py `summarize` with a subset of scorers (--scorers): the oracle, the
brute-force fixed layer and each scorer's row against a hand computation on a random table."""

from __future__ import annotations

import numpy as np

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
