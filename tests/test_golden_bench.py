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
