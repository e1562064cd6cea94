"""Edit-set building: groups and scores equal a hand computation (one record at a time, no
padding, no batching, numpy argmax), splits are deterministic, bad records are named."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from salem_jax.data import EditRecord, RecordError, edit_set_batches, load_edit_set, save_edit_set
from salem_jax.data.edit_set import split_records
from salem_jax.data.tokenize import encode
from salem_jax.edit_set_builder import build_edit_set
from salem_jax.models import hf

COUNTRIES = [
    ("france", "paris"), ("germany", "berlin"), ("italy", "rome"), ("spain", "madrid"), ("japan", "tokyo"),
    ("peru", "lima"), ("chile", "santiago"), ("egypt", "cairo"), ("kenya", "nairobi"), ("india", "delhi"),
    ("china", "beijing"), ("canada", "ottawa"), ("brazil", "brasilia"),
]
WORDS = ["paris", "berlin", "rome", "madrid", "tokyo", "lima", "red", "blue", "green", "one", "two", "europe", "asia"]


@pytest.fixture(scope="module")
def gpt2():
    return hf.tiny("gpt2")


def _ids(tok, text, special):
    return list(tok(text, add_special_tokens=special)["input_ids"])


_HAND = {}
HAND_LEN = 32


def _jitted_apply(model):
    key = id(model.apply)
    if key not in _HAND:
        import jax

        _HAND[key] = (model.apply, jax.jit(model.apply))
    return _HAND[key][1]


def _padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((1, HAND_LEN), np.int32)
    m = np.zeros((1, HAND_LEN), np.int32)
    for ids in rows:
        assert len(ids) <= HAND_LEN
    x[0, : len(rows[0])] = rows[0]
    m[0, : len(rows[0])] = 1
    return x, m


def _causal_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), V] of ONE sequence scored alone. It is right-padded to HAND_LEN so one
    jit serves every length: a causal model's logits at position t depend only on tokens <= t."""
    x, m = _padded([ids])
    return np.asarray(_jitted_apply(model)(model.params, {"input_ids": x, "attention_mask": m}))[0, : len(ids)]


def hand_causal(model, prompt, target):
    """(all target tokens argmax, share of them) for one sequence, scored alone, with numpy."""
    tok = model.tokenizer
    p = _ids(tok, prompt, True)
    t = _ids(tok, " " + target, False)
    pred = _causal_logits(model, p + t).argmax(-1)
    hits = [int(pred[len(p) - 1 + k]) == t[k] for k in range(len(t))]
    return all(hits), float(np.mean(hits))


def next_word(model, prompt):
    p = _ids(model.tokenizer, prompt, True)
    return model.tokenizer.convert_ids_to_tokens(int(_causal_logits(model, p)[-1].argmax()))


def fixture_records(model, n=10):
    """Facts from the tiny vocabulary; about half get the model's own argmax word as the answer
    (so the model "knows" them), the rest another word, some with two-word answers."""
    vocab = set(model.tokenizer.get_vocab())
    recs = []
    for i, (country, capital) in enumerate(COUNTRIES[:n]):
        prompt = f"the capital of {country} is"
        guess = next_word(model, prompt)
        if i % 2 == 0 and guess in vocab and not guess.startswith("<"):
            target = guess if i % 4 == 0 else f"{guess} {WORDS[i % len(WORDS)]}"
        else:
            target = capital if capital != guess else "yellow"
        recs.append(
            EditRecord(
                id=f"fx.json:{i}",
                prompt=prompt,
                target_true=target,
                target_new=WORDS[(i + 3) % len(WORDS)],
                rephrases=(f"what city is the capital of {country}", f"the capital city of {country} is"),
                loc_prompts=(f"the language of {COUNTRIES[(i + 1) % n][0]} is",),
                loc_targets=(WORDS[(i + 5) % len(WORDS)],),
                subject=country,
                extra={"source": "fx.json", "record": i, "format": "zsre"},
            )
        )
    return recs


def all_rows(es):
    return {r["id"]: r for s in ("train", "val") for r in es.rows(s)}


def test_correction_groups_equal_hand_computation(gpt2):
    recs = fixture_records(gpt2)
    es = build_edit_set(gpt2, recs, "correction", seed=0, batch_size=4, progress=False)
    rows = all_rows(es)
    n_pass = 0
    assert len(recs) == 10
    for rec in recs:
        ok, acc = hand_causal(gpt2, rec.prompt, rec.target_true)
        main = rows[f"{rec.id}#prompt"]
        assert main["group"] == ("pass" if ok else "fail"), rec
        assert main["base_correct"] == ok
        assert main["base_token_acc"] == pytest.approx(acc, abs=1e-6)
        assert main["target"] == rec.target_true
        rephrase_ids = [f"{rec.id}#rephrases[{k}]" for k in range(len(rec.rephrases))]
        if ok:
            n_pass += 1
            assert not any(r in rows for r in rephrase_ids)
        else:
            for k, rid in enumerate(rephrase_ids):
                r = rows[rid]
                assert r["group"] == "adapt" and r["target"] == rec.target_true
                ok_k, acc_k = hand_causal(gpt2, rec.rephrases[k], rec.target_true)
                assert r["base_correct"] == ok_k and r["base_token_acc"] == pytest.approx(acc_k, abs=1e-6)
        assert not any(f"{rec.id}#loc_prompts" in rid for rid in rows)
    # The fixture must exercise both outcomes, or the comparison above proves little.
    n_fail = len(recs) - n_pass
    assert n_pass >= 2 and n_fail >= 2
    c = es.info["counts"]["total"]
    assert (c["pass"], c["fail"], c["adapt"]) == (n_pass, n_fail, 2 * n_fail)
    assert es.info["records"]["total"] == len(recs)
    assert es.info["mode"] == "correction" and es.info["model"] == "tiny-gpt2"


def test_counterfactual_rows_equal_hand_computation(gpt2):
    recs = fixture_records(gpt2, n=6)
    es = build_edit_set(gpt2, recs, "counterfactual", seed=0, batch_size=4, progress=False)
    rows = all_rows(es)
    assert len(rows) == 6 * (1 + 2 + 1)
    for rec in recs:
        expect = [("prompt", "fail", rec.prompt, rec.target_new)]
        expect += [(f"rephrases[{k}]", "adapt", p, rec.target_new) for k, p in enumerate(rec.rephrases)]
        expect += [("loc_prompts[0]", "pass", rec.loc_prompts[0], rec.loc_targets[0])]
        for field, group, prompt, target in expect:
            r = rows[f"{rec.id}#{field}"]
            assert (r["group"], r["prompt"], r["target"], r["record_id"]) == (group, prompt, target, rec.id)
            ok, acc = hand_causal(gpt2, prompt, target)
            assert r["base_correct"] == ok and r["base_token_acc"] == pytest.approx(acc, abs=1e-6)
        assert rows[f"{rec.id}#prompt"]["target_true"] == rec.target_true


def test_buckets(gpt2):
    """Rows of different lengths land in different buckets (and still score as if alone)."""
    recs = fixture_records(gpt2, n=3)
    long_prompt = "the capital of the country that lies in europe and speaks the language of france is"
    recs.append(EditRecord(id="long", prompt=long_prompt, target_true="paris two", extra={"source": "fx"}))
    es = build_edit_set(gpt2, recs, "correction", batch_size=4, progress=False)
    assert es.info["shapes"] == [[16], [32]]
    for rid, r in all_rows(es).items():
        ok, acc = hand_causal(gpt2, r["prompt"], r["target"])
        assert r["base_correct"] == ok and r["base_token_acc"] == pytest.approx(acc, abs=1e-6), rid


def test_split_is_by_record_and_deterministic(gpt2):
    recs = fixture_records(gpt2)
    a = build_edit_set(gpt2, recs, "counterfactual", seed=3, batch_size=4, progress=False)
    b = build_edit_set(gpt2, recs, "counterfactual", seed=3, batch_size=4, progress=False)
    c = build_edit_set(gpt2, recs, "counterfactual", seed=4, batch_size=4, progress=False)
    val = lambda es: sorted({r["record_id"] for r in es.rows("val")})  # noqa: E731
    assert a.rows("train") == b.rows("train") and a.rows("val") == b.rows("val")
    assert val(a) != val(c)
    assert len(val(a)) == 1 and a.info["records"] == {"train": 9, "val": 1, "total": 10}
    # The split depends on the records and the seed only, not on the mode.
    d = build_edit_set(gpt2, recs, "correction", seed=3, batch_size=4, progress=False)
    assert val(d) == val(a)
    train_ids = {r["record_id"] for r in a.rows("train")}
    assert not train_ids & set(val(a))
    # Counts per split and group add up to the rows.
    for split in ("train", "val"):
        for g in ("fail", "adapt", "pass"):
            assert a.info["counts"][split][g] == len(a.rows(split, g))


def test_split_records_fraction():
    for n in (1, 2, 10, 101):
        m = split_records(n, 0, 0.1)
        assert m.sum() == (0 if n == 1 else max(1, round(n * 0.1)))
    assert split_records(50, 0, 0.0).sum() == 0
    assert (split_records(50, 7, 0.1) == split_records(50, 7, 0.1)).all()
    with pytest.raises(ValueError, match="val_fraction"):
        split_records(10, 0, 1.0)


def test_record_longer_than_context_is_named(gpt2):
    recs = fixture_records(gpt2, n=3)
    long = " ".join(["red"] * 70)  # the tiny GPT-2 has 64 positions
    bad = EditRecord(id="fx.json:7", prompt="the capital of peru is", target_true="lima",
                     rephrases=(long,), extra={"source": "/data/fx.json", "record": 7})
    with pytest.raises(RecordError) as e:
        build_edit_set(gpt2, recs + [bad], "correction", batch_size=4, progress=False)
    msg = str(e.value)
    # The prompt is fine; the rephrase is the one too long, so it is scored only if the prompt
    # fails. Length is checked for every candidate row before scoring.
    assert "/data/fx.json" in msg and "record 7" in msg and "'rephrases[0]'" in msg
    assert "more than the model's context (64 tokens)" in msg
    es = build_edit_set(gpt2, recs + [bad], "correction", batch_size=4, progress=False, skip_invalid=True)
    assert [s.record for s in es.skipped] == ["7"] and es.skipped[0].field == "rephrases[0]"
    assert es.info["records"]["total"] == 3 and es.info["skipped"] == 1


def test_counterfactual_needs_target_new(gpt2):
    rec = EditRecord(id="z:4", prompt="the capital of peru is", target_true="lima", extra={"source": "z.json", "record": 4})
    with pytest.raises(RecordError, match=r"z.json: record 4: field 'target_new': empty"):
        build_edit_set(gpt2, [rec], "counterfactual", progress=False)


def test_bad_arguments(gpt2):
    recs = fixture_records(gpt2, n=2)
    with pytest.raises(ValueError, match="unknown mode"):
        build_edit_set(gpt2, recs, "fix", progress=False)
    with pytest.raises(ValueError, match="duplicate record id"):
        build_edit_set(gpt2, recs + recs[:1], progress=False)
    with pytest.raises(ValueError, match="no records"):
        build_edit_set(gpt2, [], progress=False)


def test_greedy_answer_for_missing_locality_target(gpt2):
    generate = pytest.importorskip("salem_jax.generate", reason="salem_jax.generate (another helper's) not there yet")
    rec = EditRecord(id="g:0", prompt="the capital of peru is", target_true="lima", target_new="rome",
                     loc_prompts=("the capital of chile is",), loc_targets=("",), extra={"source": "g"})
    es = build_edit_set(gpt2, [rec], "counterfactual", progress=False, val_fraction=0.0)
    row = all_rows(es)["g:0#loc_prompts[0]"]
    want = generate.greedy(gpt2, gpt2.params, ["the capital of chile is"], max_new_tokens=8)[0].strip()
    assert row["target"] == want and row["group"] == "pass"


# ------------------------------------------------------------------------------- other kinds


def hand_classifier(model, text, pair):
    """The argmax class of ONE text (pair), padded to HAND_LEN with a zero attention mask."""
    enc = model.tokenizer(text, pair) if pair else model.tokenizer(text)
    x, m = _padded([enc["input_ids"]])
    tt, _ = _padded([enc["token_type_ids"]])
    logits = np.asarray(_jitted_apply(model)(model.params, {"input_ids": x, "attention_mask": m, "token_type_ids": tt}))
    return int(logits[0, 0].argmax())


def nli_records(n=8):
    labels = ("entailment", "not_entailment")
    recs = []
    for i in range(n):
        c, cap = COUNTRIES[i % len(COUNTRIES)]
        recs.append(EditRecord(
            id=f"rte.jsonl:{i}", prompt=f"{cap} is the capital of {c}", text_pair=f"{c} has a capital",
            target_true=labels[i % 2], extra={"labels": labels, "source": "rte.jsonl", "record": i, "format": "nli"},
        ))
    return recs


def test_classifier_correction_and_flips_equal_hand_computation():
    model = hf.tiny("bert", num_labels=2)
    recs = nli_records()
    es = build_edit_set(model, recs, "correction", batch_size=4, progress=False)
    rows = all_rows(es)
    preds = {rec.id: hand_classifier(model, rec.prompt, rec.text_pair) for rec in recs}
    for rec in recs:
        pred = preds[rec.id]
        r = rows[f"{rec.id}#prompt"]
        truth = rec.labels.index(rec.target_true)
        assert r["group"] == ("pass" if pred == truth else "fail")
        assert r["label"] == truth and r["target"] == rec.target_true and r["base_correct"] == (pred == truth)
    assert es.info["label_names"] == ["entailment", "not_entailment"]

    cf = build_edit_set(model, recs, "counterfactual", seed=5, batch_size=4, progress=False)
    rows = all_rows(cf)
    flipped = 0
    for i, rec in enumerate(recs):
        r = rows[f"{rec.id}#prompt"]
        truth = rec.labels.index(rec.target_true)
        # The builder draws each record's flip from default_rng([seed, 1, i]).
        flip = np.random.default_rng([5, 1, i]).random() < 0.5
        assert r["group"] == ("fail" if flip else "pass")
        assert r["label"] == (1 - truth if flip else truth)
        assert r["base_correct"] == (preds[rec.id] == r["label"])
        flipped += flip
    assert 0 < flipped < len(recs)
    assert cf.info["flip_probability"] == 0.5


def test_classifier_label_set_must_match_model(gpt2):
    model = hf.tiny("bert")  # 3 labels
    with pytest.raises(ValueError, match="has 3 output classes but the label set"):
        build_edit_set(model, nli_records(2), progress=False)
    with pytest.raises(ValueError, match="need a classifier model"):
        build_edit_set(gpt2, nli_records(2), progress=False)


def hand_seq2seq(model, prompt, target):
    """Teacher-forced argmax of ONE (source, target) pair: the source padded with a zero mask,
    the decoder right-padded (causal, so padding after a position cannot change it)."""
    tok = model.tokenizer
    src = _ids(tok, prompt, True)
    tgt = _ids(tok, target, False) + [tok.eos_token_id]
    dec = [model.config.decoder_start_token_id] + tgt[:-1]
    x, m = _padded([src])
    d, dm = _padded([dec])
    batch = {"input_ids": x, "attention_mask": m, "decoder_input_ids": d, "decoder_attention_mask": dm}
    pred = np.asarray(_jitted_apply(model)(model.params, batch))[0].argmax(-1)
    hits = [int(pred[k]) == tgt[k] for k in range(len(tgt))]
    return all(hits), float(np.mean(hits))


def test_seq2seq_scores_equal_hand_computation():
    model = hf.tiny("t5")
    recs = [EditRecord(id=f"s:{i}", prompt=f"the capital of {c} is", target_true=cap, target_new="rome",
                       rephrases=(f"what is the capital of {c}",), extra={"source": "s"})
            for i, (c, cap) in enumerate(COUNTRIES[:3])]
    es = build_edit_set(model, recs, "counterfactual", batch_size=4, progress=False)
    for rid, r in all_rows(es).items():
        ok, acc = hand_seq2seq(model, r["prompt"], r["target"])
        assert r["base_correct"] == ok and r["base_token_acc"] == pytest.approx(acc, abs=1e-6), rid


# ------------------------------------------------------------------------------- save / load / batches


def test_save_load_roundtrip_and_errors(gpt2, tmp_path):
    recs = fixture_records(gpt2, n=6)
    es = build_edit_set(gpt2, recs, "counterfactual", batch_size=4, progress=False)
    out = tmp_path / "es"
    save_edit_set(es, out)
    assert sorted(os.listdir(tmp_path)) == ["es"]  # no temporary folder left behind
    back = load_edit_set(out)
    assert back.info == json.loads(json.dumps(es.info))
    for s in ("train", "val"):
        assert back.rows(s) == es.rows(s)
    with pytest.raises(FileExistsError, match="already holds an edit set"):
        save_edit_set(es, out)
    es2 = build_edit_set(gpt2, recs, "correction", batch_size=4, progress=False)
    save_edit_set(es2, out, overwrite=True)
    assert load_edit_set(out).info["mode"] == "correction"
    assert sorted(os.listdir(tmp_path)) == ["es"]
    other = tmp_path / "notes"
    other.mkdir()
    with pytest.raises(FileExistsError, match="is not an edit set"):
        save_edit_set(es, other, overwrite=True)

    with pytest.raises(FileNotFoundError, match="no edit set at"):
        load_edit_set(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no info.json"):
        load_edit_set(other)
    (out / "info.json").write_text("{not json")
    with pytest.raises(ValueError, match="info.json is corrupt"):
        load_edit_set(out)
    (out / "info.json").write_text("{}")
    (out / "dataset_dict.json").write_text("garbage")
    with pytest.raises(ValueError, match="cannot be loaded"):
        load_edit_set(out)


def test_edit_set_batches_fixed_shapes(gpt2):
    recs = fixture_records(gpt2, n=5)
    es = build_edit_set(gpt2, recs, "counterfactual", batch_size=4, progress=False, val_fraction=0.0)
    rows = es.rows("train")
    seen = []
    for batch, chunk in edit_set_batches(gpt2, es["train"], 4, length=32):
        assert {k: v.shape for k, v in batch.items()} == {k: (4, 32) for k in batch}
        direct = encode(gpt2, [r["prompt"] for r in chunk], [r["target"] for r in chunk], length=32)
        for k, v in direct.items():
            np.testing.assert_array_equal(batch[k][: len(chunk)], v)
            assert not batch[k][len(chunk):].any()  # padding rows count nowhere
        seen += chunk
    assert seen == rows


def test_progress_bar_is_shown(gpt2, capsys):
    build_edit_set(gpt2, fixture_records(gpt2, n=3), "correction", batch_size=4, progress=True)
    assert "scoring with tiny-gpt2" in capsys.readouterr().err


# ------------------------------------------------------------------------------- real model


def _smollm2():
    try:
        from salem_jax.models import load_model

        return load_model("smollm2-135m")
    except (ImportError, ModuleNotFoundError, FileNotFoundError) as e:
        pytest.skip(f"SmolLM2 is not loadable here: {e}")


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_capitals_fail_records_are_wrong_under_greedy_decoding():
    from salem_jax.data.countries import country_records

    model = _smollm2()
    generate = pytest.importorskip("salem_jax.generate", reason="salem_jax.generate is not there yet")
    recs = country_records("capital")
    es = build_edit_set(model, recs, "correction", batch_size=32, progress=True)
    c = es.info["counts"]["total"]
    print(f"\nSmolLM2-135M country capitals: {es.info['records']['total']} records, "
          f"fail {c['fail']}, adapt {c['adapt']}, pass {c['pass']}")
    assert c["fail"] > 0 and c["pass"] > 0
    rows = [r for s in ("train", "val") for r in es.rows(s)]
    fails = [r for r in rows if r["group"] == "fail"][:12]
    passes = [r for r in rows if r["group"] == "pass"][:12]
    outs = generate.greedy(model, model.params, [r["prompt"] for r in fails + passes], max_new_tokens=8)
    for r, out in zip(fails, outs[: len(fails)]):
        assert not out.strip().startswith(r["target"]), (r["prompt"], r["target"], out)
    # A pass row's target tokens are each the argmax given the ones before: greedy decoding
    # must produce exactly them.
    for r, out in zip(passes, outs[len(fails):]):
        assert out.strip().startswith(r["target"]), (r["prompt"], r["target"], out)


def test_sample_by_group():
    from salem_jax.data.edit_set import sample_by_group

    rows = [dict(id=f"{g}{i}", group=g) for i in range(10) for g in ("pass", "fail", "adapt")]
    out = sample_by_group(rows, 4, seed=3, groups={"fail", "pass"})
    got = {g: [r["id"] for r in out if r["group"] == g] for g in ("fail", "pass", "adapt")}
    assert [len(got[g]) for g in ("fail", "pass", "adapt")] == [4, 4, 0]
    assert [r["group"] for r in out] == ["fail"] * 4 + ["pass"] * 4  # groups in sorted order
    for g in ("fail", "pass"):  # original order kept within a group
        assert got[g] == sorted(got[g], key=lambda x: int(x[len(g):]))
    assert out == sample_by_group(rows, 4, seed=3, groups={"fail", "pass"})  # deterministic
    assert sample_by_group(rows, 4, seed=4, groups={"fail", "pass"}) != out
    assert len(sample_by_group(rows, 0)) == 30 and len(sample_by_group(rows, 50)) == 30


def test_scorer_runs_the_head_at_target_positions_only(monkeypatch):
    """The edit-set scorer gathers K < S positions before the head (salem_jax.scored_logits), one
    K per bucket, and still gives the full-logits answer (`hand_causal`: each row alone, every
    position's logits)."""
    from salem_jax import edit_set_builder

    model = hf.tiny("gpt2")  # its own apply: a fresh jitted scorer, traced here
    seen = []
    real = edit_set_builder.scored_logits

    def spy(apply, params, batch):
        seen.append((batch["label_mask"].shape[-1], batch["score_pos"].shape[-1] if "score_pos" in batch else None))
        return real(apply, params, batch)

    monkeypatch.setattr(edit_set_builder, "scored_logits", spy)
    recs = fixture_records(model, n=6)
    es = build_edit_set(model, recs, "correction", batch_size=4, progress=False)
    assert seen and all(k is not None and k < s for s, k in seen), seen
    for rid, r in all_rows(es).items():
        ok, acc = hand_causal(model, r["prompt"], r["target"])
        assert r["base_correct"] == ok and r["base_token_acc"] == pytest.approx(acc, abs=1e-6), rid
    assert {r["base_correct"] for r in all_rows(es).values()} == {True, False}
