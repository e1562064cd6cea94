"""Generated answers: starts-with / contains shares against hand counts on fixed generations, the
pipeline's gen/* columns, and fluency wired to CounterFact generation prompts."""

import jax
import pytest

from salem_jax.data.records import EditRecord
from salem_jax.eval import generated
from salem_jax.eval.fluency import fluency
from salem_jax.models import hf
from salem_jax.pipeline import default_config, evaluate_method, results_table


def test_match_shares_on_fixed_generations():
    gens = [" Paris. It is", " the city of Paris", "paris", " Lyon", "  New   York is big", " Newark"]
    targets = ["Paris", "Paris", "Paris", "Paris", "new york", "New York"]
    # by hand: starts = gens 0, 2, 4; contains = 0, 1, 2, 4
    assert generated.match_shares(gens, targets) == {"starts": pytest.approx(3 / 6), "contains": pytest.approx(4 / 6)}
    assert generated.answer_match(" anything", "   ") == (False, False)
    with pytest.raises(ValueError):
        generated.match_shares(["a"], ["a", "b"])


def test_edit_generation_metrics_on_fixed_generations(monkeypatch):
    calls = []
    fixed = {"base": [" lima is", " rome", " lima"], "edited": [" rome today", " the rome", " rome"]}

    def fake(model, params, prompts, targets, *, extra_tokens, batch_size=32):
        calls.append((params, list(prompts), extra_tokens))
        return fixed[params]

    monkeypatch.setattr(generated, "generate_answers", fake)
    fail = dict(prompt="p0", target="rome")
    adapts = [dict(prompt="p1", target="rome"), dict(prompt="p2", target="rome")]
    out = generated.edit_generation_metrics(None, "base", "edited", fail, adapts, extra_tokens=3)
    assert out == {
        "gen/fail_starts_before": 0.0, "gen/fail_contains_before": 0.0,
        "gen/adapt_starts_before": 0.5, "gen/adapt_contains_before": 0.5,
        "gen/fail_starts_after": 1.0, "gen/fail_contains_after": 1.0,
        "gen/adapt_starts_after": 0.5, "gen/adapt_contains_after": 1.0,
    }
    assert calls[0] == ("base", ["p0", "p1", "p2"], 3)


def test_generation_length_is_target_tokens_plus_extra(monkeypatch):
    model = hf.tiny("gpt2", seed=3)
    seen = {}

    def fake_greedy(model, params, prompts, max_new_tokens, batch_size=32, kv_cache=None):
        seen["n"] = max_new_tokens
        return [""] * len(prompts)

    import salem_jax.generate as G

    monkeypatch.setattr(G, "greedy", fake_greedy)
    n = len(model.tokenizer(" santiago", add_special_tokens=False)["input_ids"])
    generated.generate_answers(model, model.params, ["the capital of chile is"], ["santiago"], extra_tokens=2)
    assert seen["n"] == n + 2


def test_generations_batched_across_edits_equal_each_edits_own():
    model = hf.tiny("gpt2", seed=3)
    row = lambda p, t: dict(prompt=p, target=t)  # noqa: E731
    edits = [(row("the capital of chile is", "santiago"), [row("chile capital", "santiago")]),
             (row("what is the capital of peru", "lima lima lima"), []),
             (row("red blue", "green"), [row("one two", "green"), row("yes no", "green")])]
    got = generated.generations_per_edit(model, model.params, edits, extra_tokens=2)
    for (fail, adapts), gens in zip(edits, got):
        rows = [fail, *adapts]
        want = generated.generate_answers(model, model.params, [r["prompt"] for r in rows], [r["target"] for r in rows],
                                          extra_tokens=2)
        assert gens == want
    assert len(got[1][0].split()) > len(got[0][0].split())  # the edits asked for different lengths


def test_pipeline_reports_generated_answers_and_fluency():
    from salem_jax.generate import greedy, greedy_ids

    model = hf.tiny("gpt2", seed=4)
    rec = EditRecord(id="r0", prompt="the capital of france is", target_true="paris", target_new="rome",
                     rephrases=("capital of france is",), loc_prompts=("the capital of italy is",),
                     loc_targets=("rome",),
                     extra={"generation_prompts": ["the capital of france is", "the language of japan is", "x"]})
    common = dict(label=-1, text_pair="")
    rows = [dict(id="f0", record_id="r0", group="fail", prompt=rec.prompt, target="rome", **common),
            dict(id="a0", record_id="r0", group="adapt", prompt=rec.rephrases[0], target="rome", **common),
            dict(id="p0", record_id="q0", group="pass", prompt="the capital of peru is", target="lima", **common)]
    cfg = default_config()
    cfg.progress = False
    cfg.eval.batch_size = 4
    cfg.eval.fluency_prompts, cfg.eval.fluency_tokens = 2, 6
    edited = jax.tree.map(lambda x: x * 1.3 + 0.2 if x.ndim == 2 else x, model.params)
    out = evaluate_method(model, lambda reqs: edited, rows, [], cfg, "perturb", cf_records={"r0": rec})
    n = generated.target_tokens(model, "rome") + cfg.eval.gen_extra_tokens
    for when, params in (("before", model.params), ("after", edited)):
        g = greedy(model, params, [rows[0]["prompt"], rows[1]["prompt"]], max_new_tokens=n)
        assert out[f"gen/fail_starts_{when}"] == float(generated.answer_match(g[0], "rome")[0])
        assert out[f"gen/adapt_contains_{when}"] == float(generated.answer_match(g[1], "rome")[1])
        # fluency (ROME) of the first fluency_prompts generation prompts + their greedy continuations
        tok = model.tokenizer
        ids = greedy_ids(model, params, rec.extra["generation_prompts"][:2], max_new_tokens=6)
        texts = [tok.decode(list(tok(p)["input_ids"]) + list(c), skip_special_tokens=True)
                 for p, c in zip(rec.extra["generation_prompts"][:2], ids)]
        assert out[f"gen/fluency_{when}"] == pytest.approx(fluency(texts))
    table = results_table(dict(model="m", chosen_layers=["h.1"], profile={"scorer": "salem"},
                               methods={"perturb": {**out, "layers": ["h.1"]}}, training={}))
    assert "gen starts" in table and "gen contains" in table and "fluency" in table

    cfg.eval.generate = False
    off = evaluate_method(model, lambda reqs: edited, rows, [], cfg, "perturb")
    assert not any(k.startswith("gen/") for k in off)
