"""The pipeline's `causal` (MEND on the causal-traced layer) and `rome` baselines on tiny GPT-2."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from test_rome import _capture_fn

from experiments.common import tiny_overrides
from salem_jax import pipeline as P
from salem_jax.data.edit_set import load_edit_set
from salem_jax.locate.trace_rows import rows_with_subject, subject_in_prompt

# (country, capital, counterfactual capital); every word is in the tiny tokenizer's vocabulary
FACTS = [("france", "paris", "lima"), ("peru", "lima", "rome"), ("japan", "tokyo", "cairo"),
         ("chile", "santiago", "delhi"), ("kenya", "nairobi", "tokyo"), ("india", "delhi", "paris"),
         ("egypt", "cairo", "berlin"), ("china", "beijing", "madrid"), ("canada", "ottawa", "rome"),
         ("brazil", "brasilia", "paris"), ("spain", "madrid", "ottawa"), ("italy", "rome", "nairobi")]
# records whose subject does not occur in their prompt (the subject names another country)
NO_SUBJECT = {1: "germany", 4: "germany", 7: "germany", 10: "germany"}
TEXTS = ["the capital of france is paris and the capital of peru is lima",
         "which river lies in egypt it was the river of cairo",
         "the language of japan is not the language of china",
         "he was born in india she was born in kenya they speak english"]


def _zsre(i, c, cap, alt):
    return {"subject": NO_SUBJECT.get(i, c), "src": f"in {c} the capital city is",
            "rephrase": f"in {c} which city is the capital", "alt": alt, "answers": [cap],
            "loc": f"what is the currency of {FACTS[(i + 1) % len(FACTS)][0]}", "loc_ans": "dollar"}


def _config(tmp_path, methods):
    data = tmp_path / "zsre.json"
    data.write_text(json.dumps([_zsre(i, *f) for i, f in enumerate(FACTS)]))
    text = tmp_path / "held_out.txt"
    text.write_text("\n".join(TEXTS) + "\n")
    cfg = P.default_config()
    tiny_overrides(cfg, "tiny-gpt2")
    cfg.data, cfg.format, cfg.mode = str(data), "zsre", "counterfactual"
    cfg.val_fraction = 0.5
    cfg.methods = methods
    cfg.progress = False
    cfg.editor.update(dict(steps=2, val_every=2, checkpoint_every=2, val_groups=2))
    cfg.eval.update(dict(text=str(text), n_texts=3, max_edits=3, max_pass=4, ppl_edits=0))  # texts: ROME's keys
    # the scores only: no test of the runs built on this config reads a generation (the pipeline's
    # generations are tests/test_generated.py's and tests/test_pipeline.py's)
    cfg.eval.generate = False
    cfg.trace.update(dict(facts=3, n_noise=2, restorations_per_call=8))
    # ROME's weight decay and norm clamp are relative to |W k + b|, tiny in a random model
    cfg.rome.update(dict(v_steps=4, v_lr=0.1, clamp_norm_factor=100.0, weight_decay=1e-3))
    return cfg


def _inputs(model, module_path, text):
    ids = np.asarray([model.tokenizer(text)["input_ids"]], np.int32)
    x, _ = _capture_fn(model.apply, module_path)(model.params, ids, np.ones_like(ids))  # test_rome's own interceptor
    return np.asarray(x, np.float64)


def _changed(base, edited) -> list[str]:
    """Paths ('a/b/c') of the leaves that differ between two parameter trees of the same structure."""
    a = jax.tree_util.tree_flatten_with_path(base)[0]
    b = jax.tree_util.tree_flatten_with_path(edited)[0]
    assert [p for p, _ in a] == [p for p, _ in b]
    return [jax.tree_util.keystr(p, simple=True, separator="/") for (p, x), (_, y) in zip(a, b)
            if not np.array_equal(np.asarray(x), np.asarray(y))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One pipeline run with methods causal and rome; every edit the evaluation makes is recorded."""
    tmp = tmp_path_factory.mktemp("baselines")
    cfg = _config(tmp, ("causal", "rome"))
    calls: dict[str, list] = {}
    seen: dict = {}
    orig = P.evaluate_method

    def spy(model, edit, val_rows, texts, cfg, name, **kw):
        seen["model"], seen[f"val_{name}"] = model, val_rows

        def recorded(rows):
            out = edit(rows)
            calls.setdefault(name, []).append((rows, out))
            return out

        each = kw.get("edit_each")
        if each is not None:  # MEND-based methods compute every val edit in one call: record each alone

            def recorded_each(rows):
                outs = each(rows)
                for row, out in zip(rows, outs):
                    calls.setdefault(name, []).append(([row], out))
                return outs

            kw = {**kw, "edit_each": recorded_each}
        return orig(model, recorded, val_rows, texts, cfg, name, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(P, "evaluate_method", spy)
    try:
        out = P.run_pipeline(cfg, tmp / "work")
    finally:
        mp.undo()
    return dict(out=out, work=tmp / "work", calls=calls, cfg=cfg, **seen)


def test_outputs_and_table(run):
    work, out = run["work"], run["out"]
    for f in ("results.json", "results.md", "profile_causal.json", "profile_causal.png", "profile.json"):
        assert (work / f).stat().st_size > 0, f
    assert json.loads((work / "results.json").read_text())["methods"].keys() == {"causal", "rome"}
    table = (work / "results.md").read_text()
    layer = out["training"]["causal"]["trace"]["layer"]
    assert f"| causal | {layer} |" in table and f"| rome | {layer} |" in table
    assert f"rome {out['methods']['rome']['edits']} ({out['methods']['rome']['skipped_edits']} skipped" in table
    for m in ("causal", "rome"):
        assert 0.0 <= out["methods"][m]["ea"] <= 1.0
    assert out["training"]["rome"]["steps"] == 4 and out["training"]["rome"]["layer_from"] == "causal tracing"
    assert out["training"]["rome"]["covariance"].startswith("key statistics of the 3 held-out texts")


def test_causal_layer_is_the_argmax_of_the_traced_profile(run):
    out, work, cfg = run["out"], run["work"], run["cfg"]
    prof = json.loads((work / "profile_causal.json").read_text())
    assert prof["method"] == "causal-trace" and prof["scorer"] == "effect_last_subject"
    scores = prof["scores"]["fail"]
    assert len(scores) == 2 and len(set(scores)) == 2  # two distinct scores: the argmax is meaningful
    best = prof["layers"][int(np.argmax(scores))]
    tr = out["training"]["causal"]["trace"]
    assert tr["layer"] == best == prof["chosen"][0]
    assert out["methods"]["causal"]["layers"] == [best] == out["methods"]["rome"]["layers"]
    assert out["training"]["causal"]["layers"] == [best] and out["training"]["causal"]["steps"] == 2
    # the traced facts: the first cfg.trace.facts train fail rows whose subject is in the prompt
    train = load_edit_set(work / "edit_set").rows("train")
    fails = [r for r in train if r["group"] == "fail"]
    subj = {f"{i}": NO_SUBJECT.get(i, c) for i, (c, _, _) in enumerate(FACTS)}
    ok = [r["id"] for r in fails if subj[r["record_id"].rsplit(":", 1)[-1]] in r["prompt"]]
    assert tr["facts"] == ok[: cfg.trace.facts] and len(tr["facts"]) == 3
    assert tr["skipped_rows"] == len(fails) - len(ok) > 0
    assert tr["forward_passes"] == prof["extra"]["forward_passes"] > 0
    assert prof["extra"]["fact_rows"] == tr["facts"]


def test_edits_change_only_the_layers_they_claim(run):
    model, out = run["model"], run["out"]
    i = int(out["training"]["causal"]["trace"]["layer"].split(".")[1])  # GPT-2 layer "h.i"
    kernel = f"transformer/h/{i}/mlp/c_proj/kernel"
    assert out["training"]["rome"]["weight"] == kernel
    assert run["calls"]["rome"] and run["calls"]["causal"]
    for rows, edited in run["calls"]["rome"]:
        assert _changed(model.params, edited) == [kernel], rows[0]["id"]
    for rows, edited in run["calls"]["causal"]:
        changed = _changed(model.params, edited)
        assert changed and set(changed) <= {kernel, f"transformer/h/{i}/mlp/c_fc/kernel"}, changed


def test_rome_update_is_rank_one_along_the_inverse_covariance_of_the_key(run):
    """dW = a u^T with u = (C + ridge tr(C)/d I)^-1 k*, where C = E[k k^T] over the held-out texts'
    tokens and k* the projection input at the subject's last token: both captured here."""
    model, out, cfg = run["model"], run["out"], run["cfg"]
    i = int(out["training"]["causal"]["trace"]["layer"].split(".")[1])
    module = f"transformer/h/{i}/mlp/c_proj"
    xs = np.concatenate([_inputs(model, module, t) for t in TEXTS[-cfg.eval.n_texts :]])
    C = xs.T @ xs / len(xs)
    d = C.shape[0]
    base = np.asarray(model.params["transformer"]["h"][str(i)]["mlp"]["c_proj"]["kernel"], np.float64)
    for rows, edited in run["calls"]["rome"]:
        row = rows[0]
        words = row["prompt"].split()
        assert words[0] == "in" and words[1] in {c for c, _, _ in FACTS}  # "in <subject> the capital city is"
        k = _inputs(model, module, row["prompt"])[2]  # the tiny tokenizer: <s>, then one token per word
        u = np.linalg.solve(C + cfg.rome.ridge * np.trace(C) / d * np.eye(d), k)
        # GPT-2 kernels are [in, out] (our own Flax GPT-2): transposed to [out, in] for dW = a u^T
        dw = (np.asarray(edited["transformer"]["h"][str(i)]["mlp"]["c_proj"]["kernel"], np.float64) - base).T
        s = np.linalg.svd(dw, compute_uv=False)
        assert s[0] > 0 and s[1] < 1e-4 * s[0]
        on_u = dw @ np.outer(u, u) / (u @ u)
        assert np.linalg.norm(dw - on_u) < 1e-3 * np.linalg.norm(dw)


def test_rows_without_subject_are_skipped_and_counted(run):
    out, cfg = run["out"], run["cfg"]
    val = [r for r in run["val_causal"] if r["group"] == "fail"][: cfg.eval.max_edits]
    bad = [r["id"] for r in val if int(r["record_id"].rsplit(":", 1)[-1]) in NO_SUBJECT]
    assert bad, "the fixture should put a record without its subject among the val edits"
    rome = out["methods"]["rome"]
    assert rome["skipped_edits"] == len(bad) and rome["skipped_edit_rows"] == bad
    assert rome["edits"] == len(val) - len(bad) and out["methods"]["causal"]["edits"] == len(val)
    edited_ids = [rows[0]["id"] for rows, _ in run["calls"]["rome"]]
    assert edited_ids == [r["id"] for r in val if r["id"] not in bad]
    assert out["training"]["rome"]["skipped_edits"] == len(bad)


def test_subject_lookup():
    assert subject_in_prompt("What is the capital of France", "France") == "France"
    assert subject_in_prompt("what is the capital of france", "France") == "france"
    assert subject_in_prompt("what is the capital of peru", "France") is None
    assert subject_in_prompt("anything", "") is None
    rows = [dict(id="a", record_id="r1", group="fail", prompt="capital of peru"),
            dict(id="b", record_id="r2", group="fail", prompt="capital of chile"),
            dict(id="c", record_id="r3", group="fail", prompt="capital of spain"),
            dict(id="d", record_id="r1", group="adapt", prompt="peru capital")]
    usable, skipped = rows_with_subject(rows, {"r1": "Peru", "r2": "france"}, "fail")
    assert [(r["id"], s) for r, s in usable] == [("a", "peru")] and skipped == ["b", "c"]


@pytest.mark.parametrize("method,model", [("rome", "tiny-bert"), ("causal", "tiny-bert"), ("rome", "tiny-t5")])
def test_unsupported_model_kinds_fail_clearly(tmp_path, method, model):
    cfg = _config(tmp_path, (method,))
    if model == "tiny-bert":
        data = tmp_path / "fever.json"
        data.write_text(json.dumps([{"id": i, "claim": f"paris is the capital of {c}", "label": lab}
                                    for i, (c, lab) in enumerate([("france", "SUPPORTS"), ("peru", "REFUTES")] * 3)]))
        cfg.data, cfg.format = str(data), "fever"
    cfg.model = model
    kind = "classifier" if model == "tiny-bert" else "seq2seq"
    with pytest.raises(ValueError, match=rf"method '{method}'.*{kind}"):
        P.run_pipeline(cfg, tmp_path / "work")
    assert not (tmp_path / "work" / "edit_set").exists()  # refused before any costly step


def test_unknown_method_lists_the_baselines(tmp_path):
    cfg = _config(tmp_path, ("romee",))
    with pytest.raises(ValueError, match="unknown method 'romee'.*ft_kl, causal, rome"):
        P.run_pipeline(cfg, tmp_path / "work")


def test_rome_defaults_are_rome_config_defaults():
    from salem_jax.baselines.rome import ROMEConfig
    from salem_jax.methods.rome import rome_config

    assert rome_config(P.default_config()) == ROMEConfig()
