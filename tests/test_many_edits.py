"""Many edits (salem_jax.eval.sequential) on a tiny GPT-2 with real fine-tuning edits: retention equals
a hand loop, batch T=1 equals one sequential edit, a NaN edit stops with the results so far written."""

import json

import jax
import numpy as np
import pytest

from salem_jax.errors import UserError
from salem_jax.eval import sequential as S
from salem_jax.methods.finetune import ft_edit_fn
from salem_jax.models import hf
from salem_jax.pipeline import default_config

FACTS = [("the capital of france is", "lima"), ("the capital of peru is", "paris"), ("the capital of chile is", "rome"),
         ("the language of japan is", "euro"), ("the city of spain is", "cairo")]


def _rows():
    rows = []
    for i, (p, t) in enumerate(FACTS):
        rows.append(dict(id=f"r{i}#prompt", record_id=f"r{i}", group="fail", prompt=p, target=t, label=-1,
                         text_pair=""))
        rows.append(dict(id=f"r{i}#reph", record_id=f"r{i}", group="adapt", prompt=p.replace("the ", "", 1), target=t,
                         label=-1, text_pair=""))
    for j, (p, t) in enumerate([("which river lies in egypt", "cairo"), ("the capital of italy is", "rome")]):
        rows.append(dict(id=f"q{j}#loc", record_id=f"q{j}", group="pass", prompt=p, target=t, label=-1, text_pair=""))
    return rows


KEEP = [dict(prompt="the capital of japan is", target="yen"), dict(prompt="the language of china is", target="yen")]


def _known_rows(model, prompts):
    """Keep rows the base model gets right: each prompt's target is its own argmax next token (when
    that token re-tokenizes alone after a space), so editing can break them."""
    from test_pipeline import _hand_correct

    tok, rows = model.tokenizer, []
    for i, p in enumerate(prompts):
        ids = np.asarray([tok(p)["input_ids"]], np.int32)
        a = int(np.asarray(model.apply(model.params, dict(input_ids=ids, attention_mask=np.ones_like(ids))))[0, -1].argmax())
        t = tok.decode([a]).strip()
        if t and tok(" " + t, add_special_tokens=False)["input_ids"] == [a]:
            rows.append(dict(id=f"k{i}", prompt=p, target=t))
            assert _hand_correct(model, model.params, p, t)
    return rows


@pytest.fixture(scope="module")
def setup():
    model = hf.tiny("gpt2", seed=3)
    cfg = default_config()
    cfg.progress = False
    cfg.eval.batch_size = 4
    cfg.ft.steps = 4
    cfg.ft.lr = 1e-2
    edit = ft_edit_fn(model, ("h.1",), cfg, kl=False, pass_rows=[])
    return model, cfg, edit


def _hand_acc(model, params, rows):
    from test_pipeline import _hand_correct

    return float(np.mean([_hand_correct(model, params, r["prompt"], r["target"]) for r in rows]))


def test_sequential_retention_equals_hand_loop(setup):
    model, cfg, edit = setup
    fails, adapts, passes = S.split_val(_rows(), 10)
    # + keep facts the base model gets right, so that the edits can break some (`keep_lost`)
    keep = KEEP + _known_rows(model, [f"the {w} of {c} is" for w in ("river", "city") for c in ("japan", "kenya", "peru")])
    res = S.many_edits(model, edit, fails, adapts, {"pass": passes, "keep": keep}, steps=(1, 2, 4), mode="sequential",
                       batch_size=4)
    assert [r["T"] for r in res] == [1, 2, 4]
    p, hand = model.params, {}
    for t, row in enumerate(fails[:4], 1):
        p = edit(p, [row])  # the editor applied again to the edited weights
        if t in (1, 2, 4):
            hand[t] = dict(ea=_hand_acc(model, p, fails[:t]),
                           adapt=_hand_acc(model, p, [a for r in fails[:t] for a in adapts[r["record_id"]]]),
                           keep=_hand_acc(model, p, keep), pass_=_hand_acc(model, p, passes),
                           lost=[k.get("id", k["prompt"]) for k in keep if _hand_acc(model, model.params, [k]) == 1.0
                                 and _hand_acc(model, p, [k]) == 0.0])
    keep0, pass0 = _hand_acc(model, model.params, keep), _hand_acc(model, model.params, passes)
    for r in res:
        h = hand[r["T"]]
        assert r["ea"] == pytest.approx(h["ea"]) and r["ea_first"] == pytest.approx(h["ea"])
        assert r["adapt_acc"] == pytest.approx(h["adapt"])
        assert r["keep_acc"] == pytest.approx(h["keep"])
        assert r["dd_keep_acc"] == pytest.approx(keep0 - h["keep"])
        assert r["keep_lost"] == h["lost"]  # which keep facts, by id (KEEP's have none: by prompt)
        assert r["dd_acc"] == pytest.approx(pass0 - h["pass_"])
        assert r["ea_before"] == pytest.approx(_hand_acc(model, model.params, fails[: r["T"]]))
    # the edits do something: the hand loop's first edit is learnt, and a known keep fact is lost
    assert hand[1]["ea"] == 1.0
    assert any(h["lost"] for h in hand.values()), "no keep fact lost: keep_lost is not exercised"

    # "independent": each edit on the original weights, the changes summed
    ind = S.many_edits(model, edit, fails, adapts, {}, steps=(2,), mode="independent", batch_size=4)
    p = jax.tree.map(lambda b, e1, e2: b + (e1 - b) + (e2 - b), model.params, edit(model.params, [fails[0]]),
                     edit(model.params, [fails[1]]))
    assert ind[0]["ea"] == pytest.approx(_hand_acc(model, p, fails[:2]))


def test_batch_of_one_equals_one_sequential_edit(setup):
    model, _, edit = setup
    fails, adapts, passes = S.split_val(_rows(), 10)
    kw = dict(steps=(1,), batch_size=4, generate=True)
    b = S.many_edits(model, edit, fails, adapts, {"pass": passes}, mode="batch", **kw)[0]
    s = S.many_edits(model, edit, fails, adapts, {"pass": passes}, mode="sequential", **kw)[0]
    for k in b:
        if k not in ("mode", "edit_seconds"):
            assert b[k] == pytest.approx(s[k]), k
    # batch of T: one edit of all T rows from the base weights
    b3 = S.many_edits(model, edit, fails, adapts, {}, steps=(3,), mode="batch", batch_size=4)[0]
    assert b3["ea"] == pytest.approx(_hand_acc(model, edit(model.params, fails[:3]), fails[:3]))


def test_sequential_batches_equal_a_hand_loop_of_batch_edits(setup):
    """sequential:N (AlphaEdit's protocol): the editor called on N rows at a time, each call on the
    weights the previous returned; scored after T = 2 and 4 like a hand loop of such calls."""
    model, _, edit = setup
    fails, adapts, passes = S.split_val(_rows(), 10)
    res = S.many_edits(model, edit, fails, adapts, {"pass": passes, "keep": KEEP}, steps=(2, 4), mode="sequential:2",
                       batch_size=4)
    p1 = edit(model.params, fails[0:2])
    p2 = edit(p1, fails[2:4])
    for r, p in zip(res, (p1, p2)):
        T = r["T"]
        assert r["mode"] == "sequential:2"
        assert r["ea"] == pytest.approx(_hand_acc(model, p, fails[:T]))
        ad = [a for x in fails[:T] for a in adapts[x["record_id"]]]
        assert r["adapt_acc"] == pytest.approx(_hand_acc(model, p, ad))
        assert r["keep_acc"] == pytest.approx(_hand_acc(model, p, KEEP))
    # it is neither one batch of 4 nor 4 single edits (so the comparison above can fail)
    one = edit(model.params, fails[:4])
    single = model.params
    for row in fails[:4]:
        single = edit(single, [row])
    k = lambda p: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(p)])  # noqa: E731
    assert np.abs(k(p2) - k(one)).max() > 1e-4 and np.abs(k(p2) - k(single)).max() > 1e-4
    # sequential:1 is sequential
    s1 = S.many_edits(model, edit, fails, adapts, {}, steps=(2,), mode="sequential:1", batch_size=4)[0]
    s = S.many_edits(model, edit, fails, adapts, {}, steps=(2,), mode="sequential", batch_size=4)[0]
    assert s1["ea"] == s["ea"] and s1["adapt_acc"] == s["adapt_acc"]


def test_sequential_batches_refuse_a_cut_batch_and_bad_modes(setup):
    model, cfg, edit = setup
    fails, adapts, _ = S.split_val(_rows(), 10)
    calls = []
    with pytest.raises(UserError, match=r"'sequential:2' edits 2 rows per call.*3 is not"):
        S.many_edits(model, lambda p, r: calls.append(r) or p, fails, adapts, {}, steps=(2, 3), mode="sequential:2")
    assert not calls
    assert S.parse_modes("sequential:10,batch", steps=(10, 50, 100)) == ("sequential:10", "batch")
    for bad in ("batch:2", "sequential:0", "sequential:x", "sequential:-1", "independent:3"):
        with pytest.raises(UserError, match="sequential_modes"):
            S.parse_modes(bad)
    with pytest.raises(UserError, match="multiple of 10; 5 is not"):
        S.parse_modes("sequential:10", steps=(5, 10))


def test_nan_edit_stops_named_with_earlier_results_written(setup, tmp_path):
    model, cfg, edit = setup
    calls = []

    def bad_edit(params, rows):
        calls.append(rows[0]["id"])
        out = edit(params, rows)
        if len(calls) == 3:  # the third edit blows up
            return jax.tree.map(lambda x: x * np.nan if x.ndim == 2 and x.shape[0] > 8 else x, out)
        return out

    cfg.eval.sequential, cfg.eval.sequential_modes, cfg.eval.generate = "1,2,4", "sequential", False
    with pytest.raises(S.NonFiniteEdit) as e:
        S.pipeline_study(model, bad_edit, _rows(), KEEP, [], cfg, "ft", tmp_path)
    err = e.value
    assert err.edit == 3 and err.row_id == "r2#prompt"
    assert "edit 3" in str(err) and "r2#prompt" in str(err) and err.leaves
    written = json.loads((tmp_path / "many_edits_ft.json").read_text())
    assert [r["T"] for r in written["results"]["sequential"]] == [1, 2]
    assert written["error"]["edit"] == 3 and written["error"]["row_id"] == "r2#prompt"
    # the last good parameters are those after edit 2
    fails = [r for r in _rows() if r["group"] == "fail"]
    p2 = edit(edit(model.params, [fails[0]]), [fails[1]])
    for a, b in zip(jax.tree.leaves(err.params), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nan_batch_edit_stops_named_with_earlier_batches_written(setup, tmp_path):
    """Batch mode: the batch of T = 4 gives NaN weights; the study stops with NonFiniteEdit naming the batch
    and its last row, the T = 1 and 2 batches' results written (equal to hand scores of one edit of the
    first T rows from the base weights) and the last good parameters those of the T = 2 batch."""
    model, cfg, edit = setup
    sizes = []

    def bad_edit(params, rows):
        sizes.append(len(rows))
        out = edit(params, rows)
        if len(rows) == 4:  # the third batch, all four rows at once, blows up
            return jax.tree.map(lambda x: x * np.nan if x.ndim == 2 and x.shape[0] > 8 else x, out)
        return out

    cfg.eval.sequential, cfg.eval.sequential_modes, cfg.eval.generate = "1,2,4", "batch", False
    cfg.eval.sequential_order_seed = -1
    with pytest.raises(S.NonFiniteEdit) as e:
        S.pipeline_study(model, bad_edit, _rows(), KEEP, [], cfg, "ft", tmp_path)
    err = e.value
    assert sizes == [1, 2, 4]  # each batch from the base weights, the study stopped at the bad one
    assert err.edit == 4 and err.row_id == "r3#prompt" and err.mode == "batch" and err.method == "ft"
    assert "batch edit of the first 4 val fail rows" in str(err) and "'r3#prompt'" in str(err)
    nan_leaves = sorted(jax.tree_util.keystr(k, simple=True, separator="/")
                        for k, x in jax.tree_util.tree_flatten_with_path(model.params)[0]
                        if x.ndim == 2 and x.shape[0] > 8)
    assert sorted(err.leaves) == nan_leaves and nan_leaves
    fails = [r for r in _rows() if r["group"] == "fail"]
    passes = [r for r in _rows() if r["group"] == "pass"]
    written = json.loads((tmp_path / "many_edits_ft.json").read_text())
    assert written["error"]["mode"] == "batch" and written["error"]["edit"] == 4
    assert written["error"]["row_id"] == "r3#prompt" and written["error"]["message"] == str(err)
    got = written["results"]["batch"]
    assert [r["T"] for r in got] == [1, 2] and err.study == {"batch": err.results}
    pass0 = _hand_acc(model, model.params, passes)
    for r in got:
        p = edit(model.params, fails[: r["T"]])  # one update of all T rows from the base weights
        assert r["ea"] == pytest.approx(_hand_acc(model, p, fails[: r["T"]]))
        assert r["keep_acc"] == pytest.approx(_hand_acc(model, p, KEEP))
        assert r["dd_acc"] == pytest.approx(pass0 - _hand_acc(model, p, passes))
    p2 = edit(model.params, fails[:2])
    for a, b in zip(jax.tree.leaves(err.params), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_more_edits_than_val_rows_is_refused_before_any_edit(setup, tmp_path):
    model, cfg, _ = setup
    calls = []
    cfg.eval.sequential, cfg.eval.sequential_modes = "1,6", "sequential,batch"
    with pytest.raises(UserError, match="asks for 6 edits but method 'ft' has only 5 val fail rows"):
        S.pipeline_study(model, lambda p, r: calls.append(r) or p, _rows(), [], [], cfg, "ft", tmp_path)
    assert not calls
    for bad in ("", "10,5", "0,1", "a,b", "1,1"):
        with pytest.raises(UserError, match="config.eval.sequential"):
            S.parse_steps(bad)
    with pytest.raises(UserError, match="sequential_modes"):
        S.parse_modes("sequential,twice")
    assert S.parse_steps("1, 10,50,100") == (1, 10, 50, 100)


def test_plot_and_table(tmp_path):
    studies = {"ft": {"sequential": [dict(T=1, ea=1.0, ea_first=1.0, keep_acc=1.0), dict(T=10, ea=0.5, ea_first=0.4,
                                                                                       keep_acc=0.9)]}}
    S.plot_many_edits(studies, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
    t = S.summary_table(studies)
    assert "| ft | sequential | 10 | 0.500 | 0.400 |" in t
    # a collapsed model's perplexity ratio: three significant digits, not a 70-digit cell
    t = S.summary_table({"m": {"sequential": [dict(T=1, ea=0.25, dd_ppl_text_rel=-1.9e69)]}})
    assert "| m | sequential | 1 | 0.250 |" in t and "-1.9e+69" in t and len(t.splitlines()[-1]) < 120
    assert S.keep_lost_lines(studies) == ""  # no keep_lost recorded: no section
    lost = S.keep_lost_lines({"ae": {"sequential:10": [dict(T=10, keep_lost=[]), dict(T=50, keep_lost=["k3", "k1"]),
                                                       dict(T=100, keep_lost=["k1", "k7"])]}})
    assert lost.splitlines()[2:] == ["- ae sequential:10, T = 10: 0 lost",
                                     "- ae sequential:10, T = 50: 2 lost (k3, k1); new: k3, k1",
                                     "- ae sequential:10, T = 100: 2 lost (k1, k7); new: k7"]


def test_study_edits_every_row_the_method_can_edit_beyond_max_edits(setup, tmp_path):
    """A method that cannot edit some rows (rome, rrome, alphaedit: no subject in the prompt) gives the
    one-at-a-time evaluation only the first config.eval.max_edits fail rows; the sequential study must
    still reach T beyond that, on every val fail row the method accepts (`Prepared.can_edit`), in order.
    (It used to get the max_edits rows only, so T = 100 with max_edits = 3 was refused.)"""
    from salem_jax import pipeline as P
    from salem_jax.methods.registry import Context, Method, Prepared

    model, cfg, _ = setup
    cfg.eval.update(dict(max_edits=1, sequential="1,3", sequential_modes="sequential", generate=False, ppl_edits=0))
    rows = _rows()
    skip = "r1#prompt"  # a row the method cannot edit
    edited = []

    def edit(params, rs):
        edited.extend(r["id"] for r in rs)
        return params

    def prepare(ctx, layers):
        fails = [r for r in ctx.val_rows if r["group"] == "fail"][: ctx.cfg.eval.max_edits]
        eval_rows = [r for r in ctx.val_rows if r["group"] != "fail" or r in fails]
        return Prepared(edit=edit, info={}, eval_rows=eval_rows, can_edit=lambda r: r["id"] != skip)

    method = Method(name="toy", summary="toy", supports=frozenset({"causal"}), layers=lambda ctx: ("h.1",),
                    prepare=prepare)
    ctx = Context(model=model, cfg=cfg, work=tmp_path, say=lambda m: None, val_rows=rows)
    res, _ = P.run_method(method, ctx, [], None, {})
    assert res["edits"] == 1 and edited[0] == "r0#prompt"  # the one-at-a-time evaluation: max_edits rows
    assert edited[1:] == ["r0#prompt", "r2#prompt", "r3#prompt"]  # the study: rows it can edit, r1 left out
    assert [r["T"] for r in res["many_edits"]["sequential"]] == [1, 3]


# ----------------------------------------------------------------------------- config.eval.sequential_order_seed


def _hand_study(model, edit, order, passes, steps, first):
    """A hand loop: the edits of `order` one after another, each T of `steps` scored on every edit so far."""
    p, out = model.params, {}
    keep0, pass0 = _hand_acc(model, model.params, KEEP), _hand_acc(model, model.params, passes)
    for t, row in enumerate(order, 1):
        p = edit(p, [row])
        if t in steps:
            ad = [a for r in order[:t] for a in _rows() if a["group"] == "adapt" and a["record_id"] == r["record_id"]]
            out[t] = dict(ea=_hand_acc(model, p, order[:t]), ea_first=_hand_acc(model, p, order[:min(first, t)]),
                          adapt_acc=_hand_acc(model, p, ad), keep_acc=_hand_acc(model, p, KEEP),
                          dd_keep_acc=keep0 - _hand_acc(model, p, KEEP), dd_acc=pass0 - _hand_acc(model, p, passes),
                          ea_before=_hand_acc(model, model.params, order[:t]))
    return out


def test_order_seed_applies_the_edits_in_a_seeded_order_like_a_hand_loop(setup, tmp_path, monkeypatch):
    """config.eval.sequential_order_seed = 2: the study equals a hand loop applying the first max(T) fail
    rows in numpy's permuted order (computed here), scoring every earlier edit; "EA first" is over the
    first edits of that order (FIRST set to 2 so that it is not all of T = 4's edits)."""
    model, cfg, edit = setup
    monkeypatch.setattr(S, "FIRST", 2)
    cfg.eval.sequential, cfg.eval.sequential_modes, cfg.eval.generate = "1,2,4", "sequential", False
    monkeypatch.setattr(cfg.eval, "sequential_order_seed", 2)  # seed 1 permutes 4 rows to themselves
    rows = _rows()
    fails = [r for r in rows if r["group"] == "fail"]
    passes = [r for r in rows if r["group"] == "pass"]
    perm = np.random.default_rng(2).permutation(4)
    order = [fails[i] for i in perm]
    assert [r["id"] for r in order] != [r["id"] for r in fails[:4]] and order[0] is not fails[0]  # a real reorder
    calls = []

    def recorded(params, rs):
        calls.extend(r["id"] for r in rs)
        return edit(params, rs)

    res = S.pipeline_study(model, recorded, rows, KEEP, [], cfg, "ft", tmp_path)["sequential"]
    assert calls == [r["id"] for r in order]  # the editor saw the rows in the permuted order
    hand = _hand_study(model, edit, order, passes, (1, 2, 4), first=2)
    assert [r["T"] for r in res] == [1, 2, 4]
    for r in res:
        for k, v in hand[r["T"]].items():
            assert r[k] == pytest.approx(v), (r["T"], k)
    # the reorder shows in the scores (so the comparison above can fail): record order's hand loop differs
    rec = _hand_study(model, edit, fails[:4], passes, (1, 2, 4), first=2)
    assert any(rec[t][k] != pytest.approx(hand[t][k]) for t in (1, 2, 4) for k in hand[t])
    written = json.loads((tmp_path / "many_edits_ft.json").read_text())
    assert written["order_seed"] == 2 and written["edit_order"] == [r["id"] for r in order]


def test_order_seed_unset_is_record_order_exactly(setup, tmp_path):
    """The default (-1) gives today's study: the fail rows in record order, the same numbers as
    many_edits on split_val's rows."""
    model, cfg, edit = setup
    cfg.eval.sequential, cfg.eval.sequential_modes, cfg.eval.generate = "1,2,4", "sequential", False
    assert S.check_order_seed(default_config().eval.sequential_order_seed) == -1
    cfg.eval.sequential_order_seed = -1
    got = S.pipeline_study(model, edit, _rows(), KEEP, [], cfg, "ft", tmp_path)["sequential"]
    fails, adapts, passes = S.split_val(_rows(), cfg.eval.max_pass)
    want = S.many_edits(model, edit, fails, adapts, {"pass": passes, "keep": KEEP}, steps=(1, 2, 4), mode="sequential",
                        batch_size=cfg.eval.batch_size)
    for g, w in zip(got, want, strict=True):
        assert {k: v for k, v in g.items() if k != "edit_seconds"} == {k: v for k, v in w.items() if k != "edit_seconds"}
    written = json.loads((tmp_path / "many_edits_ft.json").read_text())
    assert written["order_seed"] == -1 and written["edit_order"] == [r["id"] for r in fails[:4]]


@pytest.mark.parametrize("bad", [-2, True, 1.5, "1", None])
def test_bad_order_seed_is_refused_naming_the_key_before_any_edit(setup, tmp_path, bad):
    import ml_collections

    model, cfg, _ = setup
    calls = []
    d = cfg.to_dict()
    d["eval"].update(sequential="1,2", sequential_modes="sequential", sequential_order_seed=bad)
    bad_cfg = ml_collections.ConfigDict(d)  # a fresh ConfigDict: the setup's is typed (an int stays an int)
    with pytest.raises(UserError, match="config.eval.sequential_order_seed"):
        S.pipeline_study(model, lambda p, r: calls.append(r) or p, _rows(), [], [], bad_cfg, "ft", tmp_path)
    assert not calls


def test_bad_order_seed_on_the_command_line_names_the_key():
    from experiments.common import apply_overrides

    with pytest.raises(ValueError, match="config.eval.sequential_order_seed='x': expected an integer"):
        apply_overrides(default_config(), ["--config.eval.sequential_order_seed=x"])


def test_pipeline_refuses_a_bad_order_seed_up_front(tmp_path):
    from experiments import capitals_smollm2
    from salem_jax.testing import refused_up_front

    cfg = capitals_smollm2.get_config(tiny=True)
    cfg.eval.sequential_order_seed = -3
    refused_up_front(cfg, tmp_path / "work", "config.eval.sequential_order_seed=-3")


def test_study_logs_the_retries_of_its_own_calls_apart_from_the_modes(setup, tmp_path, monkeypatch):
    """A method with retries (config.locate_edit.retries, mend.retry.with_retries): the one-at-a-time
    evaluation's edits go to results' `edit_retries`, the study's calls (one per edit in sequential mode)
    to `many_edits_retries`, in the order made; `many_edits` keeps only its modes (the summary table and
    plot read every key of it as a mode)."""
    from salem_jax import pipeline as P
    from salem_jax.mend import retry
    from salem_jax.methods.registry import Context, Method, Prepared

    model, cfg, _ = setup
    cfg.eval.update(dict(max_edits=1, sequential="1,3", sequential_modes="sequential", generate=False, ppl_edits=0))
    monkeypatch.setattr(retry, "reached", lambda model, params, rows: np.zeros(len(rows), bool))  # never reached
    calls = []

    def edit(params, rs):
        calls.append([r["id"] for r in rs])
        return params

    def prepare(ctx, layers):
        info: dict = {}
        e, _ = retry.with_retries(model, edit, None, 1, info, name="config.locate_edit.retries")
        fails = [r for r in ctx.val_rows if r["group"] == "fail"][: ctx.cfg.eval.max_edits]
        eval_rows = [r for r in ctx.val_rows if r["group"] != "fail" or r in fails]
        return Prepared(edit=e, info=info, eval_rows=eval_rows)

    method = Method(name="toy", summary="toy", supports=frozenset({"causal"}), layers=lambda ctx: ("h.1",),
                    prepare=prepare)
    ctx = Context(model=model, cfg=cfg, work=tmp_path, say=lambda m: None, val_rows=_rows())
    res, _ = P.run_method(method, ctx, [], None, {})
    # every call is made twice (the first edit and one retry): 1 evaluation edit, then the study's 3
    assert calls == [["r0#prompt"]] * 2 + [["r0#prompt"]] * 2 + [["r1#prompt"]] * 2 + [["r2#prompt"]] * 2
    assert res["edit_retries"]["option"] == "config.locate_edit.retries" and res["edit_retries"]["retried"] == 1
    assert res["edit_retries"]["gave_up"] == 1
    assert res["many_edits_retries"] == {"max": 1, "applications": [1, 1, 1], "tried": [2, 2, 2]}
    assert list(res["many_edits"]) == ["sequential"] and [r["T"] for r in res["many_edits"]["sequential"]] == [1, 3]


# ----------------------------------------------------------------------------- portability and generated answers


# record id -> portability questions (salem_jax.eval.portability rows): r0 has none (T = 1: no portability
# scores), r1 two (so the per-edit mean differs from the question-weighted one), r2 and r3 one each
PORT_QUESTIONS = {"r1": [("capital of peru is", "paris"), ("the capital of peru", "paris")],
                  "r2": [("capital of chile is", "rome")], "r3": [("language of japan is", "euro")]}


def _portability():
    return {rid: [dict(id=f"{rid}#portability[{k}]", record_id=rid, group="portability", prompt=p, target=t, label=-1,
                       text_pair="") for k, (p, t) in enumerate(qs)] for rid, qs in PORT_QUESTIONS.items()}


def test_portability_retention_equals_hand_loop_of_one_at_a_time_scores(setup):
    """After T sequential edits, `portability` = a hand loop that applies the edits and scores every earlier
    edit's portability questions with the one-at-a-time evaluation's function (`evaluate_edit`'s
    "portability" group), averaged over the edits that have questions; `portability_before` = the same on
    the base model; absent at T = 1 (edit r0 has no questions); the table shows the column."""
    from salem_jax.eval.metrics import evaluate_edit

    model, _, edit = setup
    fails, adapts, passes = S.split_val(_rows(), 10)
    port = _portability()
    res = S.many_edits(model, edit, fails, adapts, {}, steps=(1, 2, 4), mode="sequential", batch_size=4,
                       portability=port)
    assert [r["T"] for r in res] == [1, 2, 4]
    assert not any(k.startswith("portability") or k == "n_portability" for k in res[0])  # r0: no questions

    def one_at_a_time(p, rows):  # what the one-at-a-time evaluation reports for one edit's questions
        m = evaluate_edit(model, model.params, p, {"portability": rows}, batch_size=4, progress=False)
        return m["portability"], m["portability_before"]

    p, hand = model.params, {}
    for t, row in enumerate(fails[:4], 1):
        p = edit(p, [row])
        if t in (2, 4):
            scored = [one_at_a_time(p, port[r["record_id"]]) for r in fails[:t] if r["record_id"] in port]
            hand[t] = dict(after=float(np.mean([a for a, _ in scored])), before=float(np.mean([b for _, b in scored])),
                           n=sum(len(port.get(r["record_id"], [])) for r in fails[:t]), edits=len(scored))
    for r in res[1:]:
        h = hand[r["T"]]
        assert r["portability"] == pytest.approx(h["after"]), r["T"]
        assert r["portability_before"] == pytest.approx(h["before"]), r["T"]
        assert r["n_portability"] == h["n"] and r["portability_edits"] == h["edits"]
    # the edits move the questions' answers (so the after / before comparisons above can fail)
    assert any(hand[t]["after"] != pytest.approx(hand[t]["before"]) for t in hand)
    # no questions at all: no portability fields
    none = S.many_edits(model, edit, fails, adapts, {}, steps=(2,), mode="batch", batch_size=4, portability={})
    assert not any("portability" in k for k in none[0])
    table = S.summary_table({"ft": {"sequential": res}})
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert "portability" in header
    cells = {int(row.split("|")[3]): [c.strip() for c in row.strip("|").split("|")] for row in table.splitlines()[2:]}
    k = header.index("portability")
    assert cells[1][k] == "-" and cells[4][k] == f"{res[2]['portability']:.3f}"


def test_generated_answers_before_are_the_base_models_and_in_the_table(setup, tmp_path, monkeypatch):
    """config.eval.generate in the study: `gen_starts_before` / `gen_contains_before` after T edits equal the
    base model's greedy generations of the first T edit prompts (a hand greedy call with the study's budget:
    the longest target of the study's edits + 2 tokens, hand matching), `gen_starts` / `gen_contains` the
    edited model's (hand loop); the base generations are made once per study for all modes; the table has
    `gen contains` beside `gen starts`."""
    from salem_jax.generate import greedy

    model, cfg, edit = setup
    # the tiny GPT-2's greedy continuations (seed 3): "the capital of france is" -> " is is is ...",
    # "capital" -> " capital capital capital santiago ...", "euro cairo" -> " cairo cairo europe ...",
    # "paris" -> " paris paris ...": targets it says at the start, later (only within the study's budget of
    # 2 + 2 tokens, from the 2-token "paris paris"), or not at all, different per prompt (so a wrong slice of
    # the base generations or a per-T budget changes the before shares)
    edits = [("the capital of france is", "is"), ("capital", "santiago"), ("euro cairo", "europe"),
             ("paris", "paris paris")]
    rows = [dict(id=f"r{i}#prompt", record_id=f"r{i}", group="fail", prompt=p, target=t, label=-1, text_pair="")
            for i, (p, t) in enumerate(edits)] + [r for r in _rows() if r["group"] == "pass"]
    fails = [r for r in rows if r["group"] == "fail"]
    calls = []
    real = S.base_generations_of
    monkeypatch.setattr(S, "base_generations_of", lambda *a: calls.append(1) or real(*a))
    cfg.eval.sequential, cfg.eval.sequential_modes, cfg.eval.generate = "1,2,4", "sequential,batch", True
    cfg.eval.sequential_order_seed, cfg.eval.gen_extra_tokens, cfg.eval.ppl_edits = -1, 2, 0
    study = S.pipeline_study(model, edit, rows, [], [], cfg, "ft", tmp_path)
    assert calls == [1]  # once per study, not once per mode

    budget = max(len(model.tokenizer(" " + r["target"], add_special_tokens=False)["input_ids"]) for r in fails[:4]) + 2

    def shares(gens, rs):
        norm = [(" ".join(g.split()).casefold(), " ".join(r["target"].split()).casefold()) for g, r in zip(gens, rs)]
        return float(np.mean([g.startswith(t) for g, t in norm])), float(np.mean([t in g for g, t in norm]))

    base_gens = greedy(model, model.params, [r["prompt"] for r in fails[:4]], max_new_tokens=budget)
    p, after = model.params, {}
    for t, row in enumerate(fails[:4], 1):
        p = edit(p, [row])
        if t in (1, 2, 4):
            after[t] = shares(greedy(model, p, [r["prompt"] for r in fails[:t]], max_new_tokens=budget), fails[:t])
    befores = []
    for r in study["sequential"]:
        T = r["T"]
        before = shares(base_gens[:T], fails[:T])
        befores.append(before)
        assert (r["gen_starts_before"], r["gen_contains_before"]) == pytest.approx(before), T
        assert (r["gen_starts"], r["gen_contains"]) == pytest.approx(after[T]), T
    assert befores == [(1.0, 1.0), (0.5, 1.0), (0.5, 1.0)]  # the continuations above
    # the edits change what the model says (so after and before can be told apart)
    assert any(after[t] != pytest.approx(b) for t, b in zip((1, 2, 4), befores))
    # an edit that changes nothing: after = before (the same budget for both, at every T)
    same = S.many_edits(model, lambda params, rs: params, fails, {}, {}, steps=(1, 2, 4), mode="sequential",
                        batch_size=4, generate=True, extra_tokens=2)
    for r, b in zip(same, befores, strict=True):
        assert (r["gen_starts"], r["gen_contains"]) == (r["gen_starts_before"], r["gen_contains_before"]) == b
    for r in study["batch"]:  # the same base figures in every mode
        assert r["gen_starts_before"] == pytest.approx(shares(base_gens[:r["T"]], fails[:r["T"]])[0])
    table = S.summary_table({"ft": study})
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    assert header.index("gen contains") == header.index("gen starts") + 1
    row4 = [c.strip() for c in table.splitlines()[2:][2].strip("|").split("|")]
    assert row4[2] == "4" and row4[header.index("gen contains")] == f"{study['sequential'][2]['gen_contains']:.3f}"
    assert row4[header.index("portability")] == "-"  # no portability questions given


def test_run_method_passes_the_portability_questions_to_the_study(setup, tmp_path):
    """The pipeline gives the study the portability questions the one-at-a-time evaluation gets: both
    report portability (a toy method that edits nothing: the study's figure equals its before figure)."""
    from salem_jax import pipeline as P
    from salem_jax.methods.registry import Context, Method, Prepared

    model, cfg, _ = setup
    cfg.eval.update(dict(max_edits=2, sequential="2,4", sequential_modes="sequential", generate=False, ppl_edits=0))
    method = Method(name="toy", summary="toy", supports=frozenset({"causal"}), layers=lambda ctx: ("h.1",),
                    prepare=lambda ctx, layers: Prepared(edit=lambda params, rs: params, info={}))
    ctx = Context(model=model, cfg=cfg, work=tmp_path, say=lambda m: None, val_rows=_rows())
    res, _ = P.run_method(method, ctx, [], None, {}, portability=_portability())
    assert res["portability"] is not None
    got = res["many_edits"]["sequential"]
    assert [r["portability_edits"] for r in got] == [1, 3] and [r["n_portability"] for r in got] == [2, 4]
    assert all(r["portability"] == r["portability_before"] for r in got)
    written = json.loads((tmp_path / "many_edits_toy.json").read_text())
    assert written["results"]["sequential"][1]["n_portability"] == 4
