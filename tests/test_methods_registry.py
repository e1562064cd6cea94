"""The method registry: a method added through `salem_jax.methods.register` alone runs through the
whole pipeline (tiny GPT-2), and the pipeline refuses what a method cannot do before any costly step."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_pipeline_baselines import _config

from salem_jax import methods
from salem_jax.data.edit_set import load_edit_set
from salem_jax.methods import Method, Prepared
from salem_jax.pipeline import load, read_records, run_pipeline


def _toy(name, calls, supports=("causal",), check=None):
    """An identity 'edit' on the model's first block that records every call it gets."""

    def prepare(ctx, layers):
        calls.append(("prepare", layers, len(ctx.train_rows), ctx.profile is not None))

        def edit(params, rows):
            calls.append(("edit", params, rows))
            return params

        return Prepared(edit=edit, info=dict(layers=list(layers), note="toy"))

    kw = dict(check=check) if check else {}
    return Method(name=name, summary="no edit at all", supports=frozenset(supports),
                  layers=lambda ctx: tuple(ctx.model.layers.names()[:1]), prepare=prepare, **kw)


@pytest.fixture
def registered():
    names = []

    def add(method):
        methods.register(method)
        names.append(method.name)
        return method

    yield add
    for n in names:
        methods.unregister(n)


def test_toy_method_runs_through_the_pipeline(tmp_path, registered):
    calls = []
    registered(_toy("toy_identity", calls))
    cfg = _config(tmp_path, ("toy_identity",))
    out = run_pipeline(cfg, tmp_path / "work")

    model = load(cfg, read_records(cfg))
    first = model.layers.names()[0]
    res, tr = out["methods"]["toy_identity"], out["training"]["toy_identity"]
    assert res["layers"] == [first] and tr == dict(layers=[first], note="toy")
    es = load_edit_set(tmp_path / "work" / "edit_set")
    (prep, *edits) = calls
    assert prep == ("prepare", (first,), len(es.rows("train")), True)
    # one edit per val fail row, in order, each from the base weights
    fails = [r for r in es.rows("val") if r["group"] == "fail"][: cfg.eval.max_edits]
    assert [rows for _, _, rows in edits] == [[r] for r in fails] and len(fails) == res["edits"]
    for _, params, _ in edits:
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(model.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # an identity edit changes no prediction
    assert res["ea"] == res["fail/acc_before"] and res["adapt_acc"] == res["adapt/acc_before"]
    assert res["dd_acc"] == 0.0 and res["locality"] == 1.0
    assert "| toy_identity | " in (tmp_path / "work" / "results.md").read_text()


def test_unsupported_kind_and_failed_check_are_refused_before_the_edit_set(tmp_path, registered):
    calls = []
    registered(_toy("toy_seq2seq", calls, supports=("seq2seq",)))
    cfg = _config(tmp_path, ("toy_seq2seq",))
    with pytest.raises(ValueError, match=r"method 'toy_seq2seq' \(no edit at all\) supports seq2seq.*causal model"):
        run_pipeline(cfg, tmp_path / "work")

    def check(ctx):
        raise ValueError(f"config.toy: bad for {ctx.model.name}")

    registered(_toy("toy_checked", calls, check=check))
    cfg.methods = ("toy_checked",)
    with pytest.raises(ValueError, match="config.toy: bad for"):
        run_pipeline(cfg, tmp_path / "work")
    assert not (tmp_path / "work" / "edit_set").exists() and calls == []


def test_registry_names_and_errors(registered):
    assert methods.names()[:9] == ("salem", "salem3", "mend_fixed", "ft", "ft_kl", "causal", "rome", "ke", "enn")
    toy = registered(_toy("toy_x", []))
    assert methods.get("toy_x") is toy and methods.names()[-1] == "toy_x"
    with pytest.raises(ValueError, match="already registered"):
        methods.register(_toy("toy_x", []))
    with pytest.raises(ValueError, match="unknown method 'nope'.*rome, ke, enn, salem_edit, rrome, memit, emmet, alphaedit, toy_x"):
        methods.get("nope")
    with pytest.raises(ValueError, match="subset of"):
        _toy("bad", [], supports=("vision",))
