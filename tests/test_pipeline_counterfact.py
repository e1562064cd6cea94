"""The pipeline's CounterFact scores per edit (ES/PS/NS averaged over edits as ROME does), on a tiny GPT-2."""

import jax
import numpy as np
import pytest
from test_pipeline import jit_apply

from salem_jax.data.records import EditRecord
from salem_jax.models import hf
from salem_jax.pipeline import default_config, evaluate_method, results_table


def _prob(model, params, prompt, target):
    """ROME's P(target | prompt) = exp(-mean token NLL), one unpadded sequence (numpy)."""
    tok = model.tokenizer
    p = tok(prompt)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    ids = np.asarray([p + t], np.int32)
    logits = np.asarray(jit_apply(model)(params, dict(input_ids=ids, attention_mask=np.ones_like(ids))), np.float64)[0]
    logits = logits[len(p) - 1 : len(p) + len(t) - 1]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    return float(np.exp(np.mean(logp[np.arange(len(t)), t])))


def test_counterfact_scores_per_edit_match_hand_computation():
    model = hf.tiny("gpt2", seed=4)
    recs = [
        EditRecord(id="r0", prompt="the capital of france is", target_true="paris", target_new="rome",
                   rephrases=("capital of france is", "the city of france is"),
                   loc_prompts=("the capital of italy is", "the city of spain is"), loc_targets=("paris", "paris")),
        EditRecord(id="r1", prompt="the language of japan is", target_true="yen", target_new="euro",
                   rephrases=("japan speaks",), loc_prompts=("the language of china is",), loc_targets=("yen",)),
    ]
    rows = [dict(id=f"f{i}", record_id=r.id, group="fail", prompt=r.prompt, target=r.target_new, label=-1, text_pair="")
            for i, r in enumerate(recs)]
    rows.append(dict(id="p0", record_id="q0", group="pass", prompt="the capital of peru is", target="lima", label=-1, text_pair=""))
    cfg = default_config()
    cfg.progress = False
    cfg.eval.batch_size = 4
    cfg.eval.generate = False  # the CounterFact scores only (generations and fluency: tests/test_generated.py)
    edited = jax.tree.map(lambda x: x * 1.3 + 0.2 if x.ndim == 2 else x, model.params)
    out = evaluate_method(model, lambda reqs: edited, rows, [], cfg, "perturb", cf_records={r.id: r for r in recs})

    def hand(params):
        es, ps, ns, em = [], [], [], []
        for r in recs:
            pn, pt = _prob(model, params, r.prompt, r.target_new), _prob(model, params, r.prompt, r.target_true)
            es.append(pn > pt)
            em.append(pn - pt)
            ps.append(np.mean([_prob(model, params, q, r.target_new) > _prob(model, params, q, r.target_true) for q in r.rephrases]))
            ns.append(np.mean([_prob(model, params, q, r.target_true) > _prob(model, params, q, r.target_new) for q in r.loc_prompts]))
        return dict(ES=np.mean(es), EM=np.mean(em), PS=np.mean(ps), NS=np.mean(ns))

    after, before = hand(edited), hand(model.params)
    for k in ("ES", "EM", "PS", "NS"):
        assert out[f"cf/{k}"] == pytest.approx(after[k], abs=1e-5), k
        assert out[f"cf/{k}_before"] == pytest.approx(before[k], abs=1e-5), k
    v = [after["ES"], after["PS"], after["NS"]]
    assert out["cf/Score"] == pytest.approx(0.0 if min(v) == 0 else 3 / sum(1 / x for x in v), abs=1e-6)
    table = results_table(dict(model="m", chosen_layers=["h.1"], profile={"scorer": "salem"},
                               methods={"perturb": {**out, "layers": ["h.1"]}}, training={}))
    assert "| ES |" in table and "CF score" in table
