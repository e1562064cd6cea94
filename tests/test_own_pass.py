"""editor.own_pass_per_group: locality rows from the edit's own record (CounterFact's neighbourhood
prompts of that very edit), the rest of the pass_per_group rows from the pool as before."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest


def _data(own: list[list[int]], n_pass: int, n_extra: int = 0):
    """An EditData by hand: fail row i has input_ids[i, 0] == 100 + i, pass row j has
    input_ids[j, 0] == j; pass_of[i] = own[i] (the first-pool pass rows of fail row i's record)."""
    from salem_jax.mend.train import EditData

    def rows(n, base):
        ids = np.zeros((n, 3), np.int32)
        ids[:, 0] = base + np.arange(n)
        return {"input_ids": ids, "attention_mask": np.ones((n, 3), np.int32)}

    empty = {"input_ids": np.zeros((0, 3), np.int32), "attention_mask": np.zeros((0, 3), np.int32)}
    n_fail = len(own)
    return EditData(fail=rows(n_fail, 100), adapt=empty, passes=rows(n_pass + n_extra, 0),
                    adapt_of=tuple(np.zeros(0, np.int64) for _ in range(n_fail)),
                    fail_ids=tuple(f"f{i}" for i in range(n_fail)), n_extra_pass=n_extra,
                    pass_of=tuple(np.asarray(o, np.int64) for o in own))


def _hand_epochs(n, seed, stream, count):
    """The first `count` items of shuffled epochs over range(n), epoch e = rng([seed, stream, e])."""
    out, e = [], 0
    while len(out) < count:
        out.extend(int(x) for x in np.random.default_rng([seed, stream, e]).permutation(n))
        e += 1
    return out[:count]


# fail row 0: 5 own rows, 1: 2, 2: none, 3: 1 (as CounterFact records with 10 neighbourhood prompts, or fewer)
OWN = [[0, 1, 2, 3, 4], [5, 6], [], [7]]
N_PASS = 12


def test_own_rows_replace_the_first_pool_rows_as_computed_by_hand():
    from salem_jax.mend.train import TrainConfig, train_batch

    data = _data(OWN, N_PASS)
    g, p, o, steps, seed = 2, 4, 3, 9, 5
    cfg = TrainConfig.tiny(batch_size=g, pass_per_group=p, own_pass_per_group=o, seed=seed).resolved(1)
    edits = _hand_epochs(len(OWN), seed, 0, steps * g)
    pool = _hand_epochs(N_PASS, seed, 1, steps * g * p)
    for s in range(steps):
        got = train_batch(data, cfg, s)
        fail = got["fail"]["input_ids"][:, 0, 0] - 100
        passes = got["pass"]["input_ids"][:, :, 0]
        for j in range(g):
            e = edits[s * g + j]
            assert fail[j] == e
            cands = OWN[e]
            if len(cands) > o:  # drawn without replacement by rng([seed, 4, step, group])
                cands = [int(x) for x in np.random.default_rng([seed, 4, s, j]).permutation(OWN[e])[:o]]
            want = list(cands) + pool[(s * g + j) * p:(s * g + j + 1) * p][: p - len(cands)]
            assert passes[j].tolist() == want, (s, j)
            # the own rows really are the edit's: members of its record's pass rows, no repeats
            assert set(passes[j, : len(cands)].tolist()) <= set(OWN[e])
            assert len(set(passes[j, : len(cands)].tolist())) == len(cands)


def test_all_pass_rows_own_when_the_record_has_enough():
    from salem_jax.mend.train import TrainConfig, train_batch

    data = _data([[0, 1, 2, 3, 4, 5]], N_PASS)
    cfg = TrainConfig.tiny(batch_size=1, pass_per_group=4, own_pass_per_group=4, seed=1).resolved(1)
    seen = set()
    for s in range(20):
        rows = train_batch(data, cfg, s)["pass"]["input_ids"][0, :, 0].tolist()
        assert len(set(rows)) == 4 and set(rows) <= set(range(6))
        seen.add(tuple(sorted(rows)))
    assert len(seen) > 1  # a different draw of 4 of the 6 across steps


def test_default_zero_is_todays_groups_exactly():
    """own_pass_per_group = 0 (the default): the pass rows are the pool stream alone, with or without
    pass_of, and the same as a config that never names the field."""
    from salem_jax.mend.train import TrainConfig, train_batch

    g, p, steps, seed = 2, 3, 8, 2
    cfg = TrainConfig.tiny(batch_size=g, pass_per_group=p, seed=seed).resolved(1)
    assert cfg.own_pass_per_group == 0
    with_own, without = _data(OWN, N_PASS), dataclasses.replace(_data(OWN, N_PASS), pass_of=())
    want = _hand_epochs(N_PASS, seed, 1, steps * g * p)
    for s in range(steps):
        a, b = train_batch(with_own, cfg, s), train_batch(without, cfg, s)
        for key in ("fail", "edit", "pass"):
            for k in a[key]:
                np.testing.assert_array_equal(a[key][k], b[key][k])
        assert a["pass"]["input_ids"][:, :, 0].reshape(-1).tolist() == want[s * g * p:(s + 1) * g * p]


def test_own_rows_come_from_the_first_pool_with_a_per_group_mix():
    from salem_jax.mend.train import TrainConfig, train_batch

    data = _data(OWN, N_PASS, n_extra=3)
    g, p, q, o, seed = 2, 2, 1, 1, 0
    cfg = TrainConfig.tiny(batch_size=g, pass_per_group=p, extra_pass_per_group=q, own_pass_per_group=o,
                           seed=seed).resolved(1)
    edits = _hand_epochs(len(OWN), seed, 0, 5 * g)
    extra = _hand_epochs(3, seed, 3, 5 * g * q)
    for s in range(5):
        passes = train_batch(data, cfg, s)["pass"]["input_ids"][:, :, 0]
        assert passes.shape == (g, p + q)
        for j in range(g):
            if OWN[edits[s * g + j]]:
                assert passes[j, 0] in OWN[edits[s * g + j]]
            assert passes[j, p] == N_PASS + extra[s * g + j]


def test_bad_settings_name_the_field():
    from salem_jax.mend.train import TrainConfig, train_batch

    with pytest.raises(ValueError, match="own_pass_per_group=5 must be >= 0 and at most pass_per_group=4"):
        TrainConfig.tiny(pass_per_group=4, own_pass_per_group=5).resolved(1)
    with pytest.raises(ValueError, match="own_pass_per_group=-1"):
        TrainConfig.tiny(own_pass_per_group=-1).resolved(1)
    cfg = TrainConfig.tiny(batch_size=1, pass_per_group=2, own_pass_per_group=1).resolved(1)
    with pytest.raises(ValueError, match="own_pass_per_group=1: none of the split's 3 fail rows"):
        train_batch(_data([[], [], []], N_PASS), cfg, 0)
    with pytest.raises(ValueError, match="has no pass_of"):
        train_batch(dataclasses.replace(_data(OWN, N_PASS), pass_of=()), cfg, 0)


def test_prepare_splits_finds_each_fail_rows_own_pass_rows():
    """pass_of by hand: the first-pool pass rows with the fail row's record_id (second-pool rows,
    marked pass_pool='extra', are never own rows)."""
    from salem_jax.mend.train import prepare_splits, own_pass_counts
    from salem_jax.models import hf

    model = hf.tiny("gpt2", n_layer=1)
    row = lambda rid, g, i, extra=False: dict(  # noqa: E731
        id=f"{rid}#{g}{i}", record_id=rid, group=g, prompt=f"prompt {rid} {g} {i} is", target=" x",
        **({"pass_pool": "extra"} if extra else {}))
    train = [row("a", "pass", 0), row("a", "fail", 0), row("b", "fail", 0), row("b", "pass", 0),
             row("a", "pass", 1), row("a", "pass", 2, extra=True), row("c", "pass", 0), row("d", "fail", 0),
             row("b", "pass", 1)]
    out = prepare_splits(model, {"train": train, "val": [row("e", "fail", 0), row("e", "pass", 0)]})
    tr = out["train"]
    # first-pool pass rows in split order: a0, b0, a1, c0, b1 (then the extra a2)
    assert [x.tolist() for x in tr.pass_of] == [[0, 2], [1, 4], []]
    assert own_pass_counts(tr).tolist() == [2, 2, 0]
    assert [x.tolist() for x in out["val"].pass_of] == [[0]]


def test_pipeline_note_and_refusal():
    from salem_jax.pipeline import own_pass_note

    rows = [dict(record_id=r, group=g) for r, g in
            [("a", "fail"), ("a", "pass"), ("a", "pass"), ("b", "fail"), ("c", "pass"), ("d", "fail")]
            + [("d", "pass")] * 4]
    note = own_pass_note(rows, 2)
    assert "2 of 3 train fail rows have some, 2 have 2 or more (median 2 per record)" in note
    with pytest.raises(ValueError, match="config.editor.own_pass_per_group=2: none of the train split's 1 fail rows"):
        own_pass_note([dict(record_id="a", group="fail"), dict(record_id="b", group="pass")], 2)


@pytest.mark.slow
def test_tiny_counterfact_job_trains_on_own_rows(tmp_path, monkeypatch):
    """--config.editor.own_pass_per_group=2 in the tiny CounterFact experiment: the editor trains,
    and every group's first pass rows are its own record's."""
    import json

    import salem_jax.mend.train as mtrain
    from experiments import counterfact_smollm2

    seen = []
    real = mtrain._own_pass_choice

    def spy(data, edits, pool, o, key):
        out = real(data, edits, pool, o, key)
        seen.append((data, edits.copy(), out.copy()))
        return out

    monkeypatch.setattr(mtrain, "_own_pass_choice", spy)
    argv = ["--tiny", "--workdir", str(tmp_path), "--config.progress=false", "--config.methods=mend_fixed",
            "--config.editor.pass_per_group=3", "--config.editor.own_pass_per_group=2"]
    assert counterfact_smollm2.main(argv) == 0
    assert seen
    for data, edits, out in seen:
        for j in range(edits.shape[0]):
            own = data.pass_of[int(edits[j, 0])]
            m = min(2, len(own))
            assert set(out[j, :m].tolist()) <= set(own.tolist())
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["config"]["editor"]["own_pass_per_group"] == 2
    assert res["methods"]["mend_fixed"]["edits"] >= 1


@pytest.mark.parametrize("editor_seed", [None, 1])
def test_cf_own_pass_editor_seed_reaches_only_the_editors_train_config(monkeypatch, editor_seed):
    """benchmarks/cf_own_pass.py --editor-seed: the editor's TrainConfig (what `train_mend` trains
    with) gets that seed and the method's own_pass_per_group; the pipeline's config (edit set, split,
    evaluation) keeps its seed. Without the flag, both seeds are config.seed."""
    from benchmarks import cf_own_pass as B
    from salem_jax.methods.mend import train_config
    from salem_jax.methods.registry import Context, Prepared
    from salem_jax.pipeline import default_config

    cfg = default_config()
    cfg.seed, cfg.editor.own_pass_per_group = 7, 2
    seen = []

    def spy(ctx, layers, name):
        tc = train_config(ctx.cfg)
        seen.append((name, layers, tc.seed, tc.own_pass_per_group))
        return Prepared(edit=None, info={})

    monkeypatch.setattr(B, "prepare_mend", spy)
    ctx = Context(model=None, cfg=cfg, work=None)
    own = B._prepare("salem_edit_own", None, "layers.27", editor_seed)(ctx, ("layers.27",))
    base = B._prepare("salem_edit_base", 0, "layers.27", editor_seed)(ctx, ("layers.27",))
    want = 7 if editor_seed is None else editor_seed
    assert seen == [("salem_edit_own", ("layers.27",), want, 2), ("salem_edit_base", ("layers.27",), want, 0)]
    assert (own.info["editor_seed"], own.info["own_pass_per_group"]) == (want, 2)
    assert (base.info["editor_seed"], base.info["own_pass_per_group"]) == (want, 0)
    assert (cfg.seed, cfg.editor.own_pass_per_group) == (7, 2)  # the pipeline's config is not changed


def test_cf_own_pass_refuses_a_negative_editor_seed():
    from benchmarks import cf_own_pass as B

    with pytest.raises(SystemExit, match="--editor-seed must be >= 0, got -1"):
        B.main(["--layer", "layers.27", "--editor-seed", "-1"])
