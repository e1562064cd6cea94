"""The whole SaLEM pipeline as one function: edit set -> salient layer -> editor -> evaluation.

`run_pipeline(cfg, workdir)` is what every experiment in `experiments/` calls; `cfg` is an
`ml_collections.ConfigDict` laid out like `default_config()` (salem_jax.config: every default and
what it means). Steps (the marked sections of
`run_pipeline`):

1. load the model (`load_model`, or a tiny random one for `tiny` configs) and the held-out text;
   refuse unknown methods, and methods this kind of model or config cannot run, before any costly step;
2. read the records and build the edit set (fail / adapt / pass, 90:10 train/val by record);
3. locate: the saliency profile on the train split (paper eq. 2-5) -> the edit layer(s); and ROME's
   causal tracing of train fail rows when a configured method uses the traced layer;
4. the held-out keep set (`config.eval.keep`), if any;
5. for each method in `cfg.methods` (a `salem_jax.methods` registry name: `salem`, `salem3`,
   `mend_fixed`, `ft`, `ft_kl`, `causal`, `rome`, or one you registered), `prepare` it (train an
   editor, fit statistics) into an edit function (params, request rows -> edited params) and
   evaluate it on the val split, one edit at a time (as MEND and the paper report): edit accuracy
   on the fail row, adapt accuracy on its rephrasings, drawdown / locality on the val pass rows,
   and perplexity change on held-out text for the first `eval.ppl_edits` edits;
   with `config.eval.sequential=T1,T2,...` also edits the val fail rows one after another on the same
   weights (and in one batch) and scores retention after T edits (salem_jax.eval.sequential);
6. write `results.json`, `results.md` and plots into `workdir` (many_edits_*.json, many_edits.png/.md).
   A non-finite edit in a many-edits study (`NonFiniteEdit`) stops the run after writing them with
   the results so far and `stopped` (which method, mode and edit; the methods not run).

Every intermediate result is written as it is produced (edit set, profile, editor checkpoints),
so a killed run resumes: the editor from its last checkpoint, the rest recomputed (cheap).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from tqdm import tqdm

from salem_jax import methods as method_registry
from salem_jax import parallel, sharding
from salem_jax.config import EDITOR_SEED_TOP, check_editor_seed, default_config  # noqa: F401  (experiments import default_config from here)
from salem_jax.data import paths, readers
from salem_jax.data.countries import country_records
from salem_jax.edit_set_builder import build_edit_set
from salem_jax.data.edit_set import load_edit_set, save_edit_set
from salem_jax.data.records import RecordList
from salem_jax.data.spec import DataSpec
from salem_jax.data.spec import read_records as read_spec
from salem_jax.data.spec import resolve as resolve_spec
from salem_jax.eval.counterfact import evaluate_counterfact, harmonic_mean
from salem_jax.eval.generated import (edit_generation_metrics, generation_fluency_metrics,
                                       generations_before_after_edits, generations_per_edit, kept_edit)
from salem_jax.eval.keep import country_facts_outside_keep, keep_rows, split_by_relation
from salem_jax.eval import sequential as many
from salem_jax.eval.edits import EditEvaluator
from salem_jax.eval.portability import portability_rows
from salem_jax.locate.plot import plot_profile
from salem_jax.locate.choose import LocateConfig, locate
from salem_jax.locate.trace_rows import rows_with_subject
from salem_jax.mend.train import place_base_params, prepare_splits
from salem_jax.mend.nullspace import check_energy, check_facts_weight, parse_null_facts
from salem_jax.mend.retry import check_retries
from salem_jax.methods import Context, Method
from salem_jax.models import hf, llama, load_model


# ----------------------------------------------------------------------------- steps


def load(cfg, records=None) -> Any:
    """The configured model; classifiers get as many classes as the records' label set."""

    labels = records[0].labels if records else ()
    kw = {"num_labels": len(labels)} if labels else {}
    if cfg.model.startswith("tiny-"):  # tiny random models for the `tiny` configs and tests
        arch = cfg.model[len("tiny-") :]
        if arch == "llama":
            return llama.tiny_llama(seed=cfg.seed)
        return hf.tiny(arch, seed=cfg.seed, **kw)
    return load_model(cfg.model, dtype=cfg.dtype, **kw)


def data_spec(cfg) -> DataSpec:
    """The records the config names (fields data, format, relation, limit, seed, data_dir)."""
    return DataSpec(data=cfg.data, format=cfg.format, relation=cfg.relation, limit=cfg.limit or None, seed=cfg.seed,
                    data_dir=cfg.data_dir or None)


def read_records(cfg):
    """The configured records; `text` paragraphs become edits (`text_edits`)."""
    fmt, recs = read_spec(data_spec(cfg))
    return text_edits(recs) if fmt == "text" else recs


def text_edits(recs):
    """WikiText as MEND uses it: each edit teaches the model a paragraph's real continuation
    (target_new = the continuation, so the counterfactual builder makes every record an edit);
    locality is the next paragraph with its own continuation."""

    n = len(recs)
    if n < 2:
        raise ValueError("text edits need at least two paragraphs (one is the other's locality input)")
    out = [
        dataclasses.replace(
            r,
            target_new=r.target_true,
            loc_prompts=(recs[(i + 1) % n].prompt,),
            loc_targets=(recs[(i + 1) % n].target_true,),
        )
        for i, r in enumerate(recs)
    ]
    return RecordList(out, skipped=recs.skipped, sources=recs.sources)


def held_out_texts(cfg) -> tuple[list[str], str]:
    """Held-out plain text for the perplexity drawdown, and a note saying where it came from."""

    if not cfg.eval.text or cfg.eval.n_texts <= 0:
        return [], "perplexity on held-out text not requested"
    try:
        path = cfg.eval.text if os.path.exists(cfg.eval.text) else paths.find_data_file(cfg.eval.text, cfg.data_dir or None)
    except Exception as e:  # reported in the results, never silently
        return [], f"no held-out text ({e}); text perplexity drawdown not measured"
    # the LAST paragraphs of the file: the wikitext experiments edit its first ones
    texts = list(readers.read_text(path))[-cfg.eval.n_texts :]
    return texts, f"the last {len(texts)} paragraphs of {path}"


def keep_seed(cfg) -> int:
    """The keep set's seed: config.eval.keep_seed when >= 0, else (-1, the default) the top-level seed."""
    seed = check_editor_seed(cfg.eval.get("keep_seed", EDITOR_SEED_TOP), "config.eval.keep_seed")
    return int(cfg.seed) if seed == EDITOR_SEED_TOP else seed


def keep_set(model, cfg, exclude_prompts=()) -> tuple[list[dict], str]:
    """The held-out keep rows of `cfg.eval.keep` (see salem_jax.eval.keep) and a note on them."""
    spec = cfg.eval.keep
    if not spec:
        return [], "no keep set (config.eval.keep)"
    seed = keep_seed(cfg)
    if spec.startswith("countries:"):
        relations = [r for r in spec[len("countries:") :].split(",") if r]
        if not relations:
            raise ValueError(f"config.eval.keep={spec!r}: name the relations after 'countries:', e.g. countries:region,currency")
        records, source = country_records(relations, seed=seed), f"country {', '.join(relations)} facts"
    else:
        keep_spec = DataSpec(data=spec, format=cfg.eval.keep_format or cfg.format, data_dir=cfg.data_dir or None)
        fmt, path = resolve_spec(keep_spec)
        records, source = read_spec(keep_spec)[1], f"{path} ({fmt})"
    rows = keep_rows(model, records, max_rows=cfg.eval.max_keep, seed=seed, batch_size=cfg.eval.batch_size,
                     exclude_prompts=exclude_prompts, progress=cfg.progress)
    return rows, f"{len(rows)} rows of {source} the base model gets right (of {len(records)} records)"


def train_pass_candidates(records, train_rows, val_rows, keep, relations) -> list:
    """The records extra train pass rows may come from (config `train_pass`; used by `train_pass_set`).

    records: EditRecords of the country data (any relations; `extra["country"]` names the country);
    train_rows / val_rows: the edit set's splits; keep: the held-out keep rows; relations: the
    relations the extra rows may have. A record qualifies when its relation is in `relations`,
    its country is a country of the TRAIN split and of no val row, of no keep row, and its prompt
    is neither a keep row's nor an edit-set row's. So the extra rows are strictly disjoint from
    the keep set (no shared fact, no shared country) and from the val split's countries: the
    keep-set drawdown still measures facts of countries the editor never saw. Returns the
    qualifying records in input order."""
    by_id = {r.id: r for r in records}

    def countries(rows):
        return {by_id[r["record_id"]].extra.get("country") for r in rows if r["record_id"] in by_id} - {None}

    train_c = countries(train_rows) - countries(val_rows)  # the keep rows' countries: country_facts_outside_keep
    return country_facts_outside_keep(records, keep, relations, countries=train_c,
                                      other_rows=list(train_rows) + list(val_rows))


def check_null_facts(cfg) -> None:
    """config.editor.null_facts / null_facts_weight checked before any costly step: a valid spec
    (`nullspace.parse_null_facts`), a weight > 0 and a projection to add them to (null_energy > 0).
    Any data format: on the countries data the facts are of train countries (`null_fact_rows`), on
    other data (CounterFact, zsRE) of any country outside the keep set."""
    spec = cfg.editor.get("null_facts", "")
    parse_null_facts(spec, "config.editor.null_facts")
    if not spec:
        return
    check_facts_weight(cfg.editor.get("null_facts_weight", 1.0), "config.editor.null_facts_weight")
    if not cfg.editor.get("null_energy", 0.0):
        raise ValueError(f"config.editor.null_facts={spec!r} adds fact keys to the editor's null-space projection, but "
                         "config.editor.null_energy is 0 (no projection): set null_energy > 0 or null_facts=''")


def null_fact_rows(cfg, train_rows, val_rows, keep) -> tuple[list[dict], str]:
    """The fact rows whose keys join the editor's null-space covariance (config.editor.null_facts;
    `mend.nullspace.null_projection`'s facts), and a note on them: {"prompt", "target", "record_id",
    "country"} (country None for an edit-set row of data that is not the countries data).

    On the countries data (config.format 'countries': the edits are country facts):
    'countries:REL,REL': the records `train_pass_candidates` gives (facts of those relations of
    TRAIN-split countries that are no val row's and no keep row's country, prompts of no keep or
    edit-set row), every one of them (the model need not know a fact for its keys to count).
    'edit_pass': the edit set's train pass rows of those same countries (capitals the model knows).

    On any other data (CounterFact, zsRE: the edits are not country facts, so there are no train
    countries): 'countries:REL,REL' = the facts of those relations of every country that is no keep
    row's country, prompts of no keep or edit-set row (`country_facts_outside_keep` with any country,
    as AlphaEdit's country-fact memory); 'edit_pass' = the edit set's train pass rows (on CounterFact
    the train records' neighbourhood prompts with their true object) whose prompt is no val row's
    and no keep or train fail / adapt row's (a neighbourhood prompt shared by a train and a val
    record is left out).

    Strictly disjoint from the keep set and the val split, by prompt and (country facts) by country:
    checked here again, a RuntimeError if violated. Never the train fail / adapt rows themselves (on
    the countries data a train pass row may ask a train edit's question with its true answer)."""
    relations, edit_pass = parse_null_facts(cfg.editor.null_facts, "config.editor.null_facts")
    all_records = country_records("all", seed=cfg.seed)
    by_id = {r.id: r for r in all_records}
    country_data = cfg.format == "countries"

    def country(row):
        r = by_id.get(row["record_id"])
        return r.extra.get("country") if r is not None else None

    bad_c = {country(r) for r in list(keep) + (list(val_rows) if country_data else [])} - {None}
    train_c = ({country(r) for r in train_rows} - bad_c - {None}) if country_data else None
    banned = {r["prompt"] for r in list(val_rows) + list(keep)}
    edits = {r["prompt"] for r in train_rows if r["group"] != "pass"}  # the train edits (fail / adapt rows)
    rows, parts = [], []
    if relations:
        if country_data:
            cands = train_pass_candidates(all_records, train_rows, val_rows, keep, relations)
        else:
            cands = country_facts_outside_keep(all_records, keep, relations, countries=None,
                                               other_rows=list(train_rows) + list(val_rows))
        rows += [dict(prompt=r.prompt, target=r.target_true, record_id=r.id, country=r.extra["country"]) for r in cands]
        parts.append(f"{len(cands)} country {', '.join(relations)} facts")
    if edit_pass:
        if country_data:
            own = [dict(prompt=r["prompt"], target=r["target"], record_id=r["record_id"], country=country(r))
                   for r in train_rows if r["group"] == "pass" and country(r) in train_c and r["prompt"] not in banned]
            parts.append(f"{len(own)} edit-set train pass rows")
        else:
            cand = [r for r in train_rows if r["group"] == "pass"]
            own = [dict(prompt=r["prompt"], target=r["target"], record_id=r["record_id"], country=None)
                   for r in cand if r["prompt"] not in banned and r["prompt"] not in edits]
            parts.append(f"{len(own)} edit-set train pass rows (of {len(cand)}; {len(cand) - len(own)} left out: their "
                         "prompt is a val, keep or train edit row's)")
        rows += own
    # (on the countries data an edit_pass row may share its prompt with a train fail row - another
    # country's capital question with its true answer: the tiny capitals job has 20 such rows, session
    # 21's SmolLM2 capitals edit set none; the countries data's rule is kept as it was)
    leaked = [r for r in rows if r["prompt"] in banned or r["country"] in bad_c
              or (r["prompt"] in edits if not country_data else r["country"] not in train_c)]
    if leaked:
        raise RuntimeError(f"null_fact_rows: {len(leaked)} fact rows share a prompt or country with the keep set or the "
                           f"val split (e.g. {leaked[0]['prompt']!r}); this is a bug")
    if not rows:
        where = "a train country outside the keep set and the val split" if country_data else \
            "a country outside the keep set, nor a train pass row outside the val split and the keep set"
        raise ValueError(f"config.editor.null_facts={cfg.editor.null_facts!r}: no fact of {where}")
    n_c = len({r["country"] for r in rows} - {None})
    scope = "train countries outside the keep set and the val split" if country_data else "countries outside the keep set"
    return rows, (f"{' + '.join(parts)} ({len(rows)} rows, {n_c} {scope}; weight {cfg.editor.null_facts_weight:g})")


def train_pass_set(model, cfg, train_rows, val_rows, keep) -> tuple[list[dict], str]:
    """Extra pass rows for the editors' TRAINING split only (config `train_pass`, e.g.
    "countries:region,currency,languages"; at most `max_train_pass` rows the base model gets
    right): harder locality data for the KL term, other facts of the train countries.

    Why: with only the edit set's pass rows (other capitals) the editor's locality term never sees
    another relation of the same countries, and the keep-set drawdown is measured on exactly such
    facts. The rows come from `train_pass_candidates` (disjoint from the keep set by fact and by
    country, and from the val countries); editability and saliency do not see them (they read the
    edit set's train rows), the val split is unchanged. Rows: {"id": "train_pass:ID", "record_id",
    "group": "pass", "prompt", "target"}."""
    spec = cfg.train_pass
    if not spec.startswith("countries:") or not [r for r in spec[len("countries:"):].split(",") if r]:
        raise ValueError(f"config.train_pass={spec!r}: give 'countries:REL,REL' (e.g. countries:region,currency,languages) "
                         "or '' for none")
    if cfg.format != "countries":
        raise ValueError(f"config.train_pass needs the countries data (format {cfg.format!r}); set config.train_pass=''")
    relations = [r for r in spec[len("countries:"):].split(",") if r]
    # every relation's records, so keep rows of any country relation name their country
    all_records = country_records("all", seed=cfg.seed)
    cands = train_pass_candidates(all_records, train_rows, val_rows, keep, relations)
    if not cands:
        raise ValueError(f"config.train_pass={spec!r}: no candidate facts of train countries outside the keep set")
    rows = keep_rows(model, cands, max_rows=cfg.max_train_pass, seed=cfg.seed, batch_size=cfg.eval.batch_size,
                     progress=cfg.progress)
    rows = [dict(r, id=f"train_pass:{r['record_id']}", group="pass") for r in rows]
    n_c = len({by.extra["country"] for by in cands})
    return rows, (f"{len(rows)} extra train pass rows of country {', '.join(relations)} facts the base model gets right "
                  f"(of {len(cands)} candidates, {n_c} train countries outside the keep set and the val split)")


def saliency(model, rows: list[dict], cfg):
    """SaLEM's saliency profile (cfg.saliency) of at most max_examples rows of each profiled group."""
    sc = cfg.saliency
    wanted = tuple(sorted(set(sc.groups) | {sc.select_group}))
    lc = LocateConfig(scorer=sc.scorer, part=sc.part, top_k=sc.top_k, select_group=sc.select_group,
                      micro_batch=sc.micro_batch, max_examples=sc.max_examples, groups=wanted, seed=cfg.seed)
    return locate(model, rows, "saliency", lc, progress=cfg.progress)


# ----------------------------------------------------------------------------- locate


def causal_trace_layer(model, train_rows: list[dict], subjects: dict[str, str], cfg, work: Path,
                       methods: tuple[str, ...]) -> tuple[str, dict]:
    """ROME's layer choice: causal-trace (last subject token) up to `cfg.trace.facts` train fail rows
    whose subject occurs in their prompt; writes work/profile_causal.json and .png.
    Returns (chosen layer, summary for the results)."""
    usable, skipped = rows_with_subject(train_rows, subjects, "fail")
    if not usable:
        raise ValueError(
            f"method(s) {', '.join(methods)} need causal tracing, but none of the {len(skipped)} train fail rows "
            f"has a subject (field 'subject' of the {cfg.format!r} records from {cfg.data!r}) that occurs in its "
            "prompt; use records with subjects or set config.rome.layer for rome"
        )
    t = time.perf_counter()
    lc = LocateConfig(select_group="fail", max_facts=cfg.trace.facts or None, select="last_subject",
                      n_noise=cfg.trace.n_noise, restorations_per_call=cfg.trace.restorations_per_call, seed=cfg.seed)
    prof = locate(model, train_rows, "causal-trace", lc, subjects=subjects, progress=cfg.progress)
    if _main_process():
        (work / "profile_causal.json").write_text(prof.to_json())
        plot_profile(prof, str(work / "profile_causal.png"))
    info = dict(
        layer=prof.chosen[0], facts=list(prof.extra["fact_rows"]), forward_passes=prof.extra["forward_passes"],
        sequences=prof.extra["sequences"], n_noise=prof.extra["n_noise"], select="last_subject",
        skipped_rows=len(skipped), skipped_row_ids=list(skipped), profile="profile_causal.json",
        seconds=time.perf_counter() - t,
    )
    return prof.chosen[0], info


# ----------------------------------------------------------------------------- evaluation


CF_KEYS = ("ES", "EM", "PS", "PM", "NS", "NM")  # ROME's CounterFact metrics, per edit


# evaluate_method computes a method's `edit_each` edits this many records at a time: the edited kernels
# of a chunk are held together (the main job's 19 val edits: one chunk, one call)
EDIT_EACH_CHUNK = 32


# the per-edit metrics `evaluate_method` keeps in out["per_edit"] (when measured)
PER_EDIT_KEYS = ("ea", "ea_token", "adapt_acc", "dd_acc", "dd_keep_acc", "locality", "dd_ppl_text_rel",
                 "gen/fail_starts_after")


def evaluate_method(model, edit: Callable, val_rows: list[dict], texts: list[str], cfg, name: str,
                    keep: list[dict] = (), cf_records: dict | None = None, portability: dict | None = None,
                    edit_each: Callable | None = None) -> dict:
    """Edit each val fail record on its own (base weights each time); average the per-edit metrics.
    edit(rows) -> params; edit_each(rows) -> [edit([row]) for each row], computed together (a
    method's `Prepared.edit_each`; None: one `edit` call per record).

    The base model's scores on the pass rows, the keep rows (`keep_set`) and held-out text are
    computed once and reused; the fail row and its rephrasings are scored before and after each
    edit. With keep rows, `dd_keep_acc` is their accuracy before minus after, and each edit's entry of
    out["per_edit"] lists the keep rows it broke (`keep_lost`: their ids, right before, wrong after). With `cf_records`
    (record id -> CounterFact record, for CounterFact data) each edit is also scored with ROME's
    metrics on its own record (salem_jax.eval.counterfact): `cf/ES`, `cf/EM`, `cf/PS`, `cf/PM`,
    `cf/NS`, `cf/NM` averaged over edits as ROME's summary does, `cf/Score` their harmonic mean,
    and the same on the base model as `cf/*_before`. With `portability` (record id -> portability rows,
    salem_jax.eval.portability) each edit's questions are scored too (`portability`, `portability_before`).
    With config.eval.generate, greedy generations of the edit prompt and its rephrasings before and after
    (salem_jax.eval.generated: `gen/*`), and ROME's fluency on CounterFact generation_prompts for the first
    config.eval.fluency_edits edits."""
    t_setup = time.perf_counter()
    fails = [r for r in val_rows if r["group"] == "fail"][: cfg.eval.max_edits]
    adapts: dict[str, list[dict]] = {}
    for r in val_rows:
        if r["group"] == "adapt":
            adapts.setdefault(r["record_id"], []).append(r)
    passes = {"pass": [r for r in val_rows if r["group"] == "pass"][: cfg.eval.max_pass]}
    subgroups, keep_rels = {}, []
    if keep:
        passes["keep"] = list(keep)
        if cfg.eval.get("keep_split", False):  # each relation's keep rows also a group: keep_REL/...
            passes["keep"], spans = split_by_relation(keep)
            keep_rels = list(spans)
            subgroups = {f"keep_{rel}": ("keep", a, b) for rel, (a, b) in spans.items()}
    # every shape fixed up front (salem_jax.eval.edits): the evaluation compiles once per split,
    # not once per edit's padded length and number of scored positions
    with_text = bool(texts) and cfg.eval.ppl_edits > 0
    own = [{"fail": [row], "adapt": adapts.get(row["record_id"], []),
            "portability": (portability or {}).get(row["record_id"], [])} for row in fails]
    evaluator = EditEvaluator(model, model.params, own, passes, texts=texts if with_text else None,
                              text_window=cfg.eval.text_window, batch_size=cfg.eval.batch_size,
                              shared_subgroups=subgroups, lost_rows=("keep",) if keep else ())
    # causal LMs: every edit is applied first (its changed leaves kept, `kept_edit`), then all are
    # scored in a few vmapped calls (`EditEvaluator.evaluate_many`) and the base and edited models'
    # greedy generations come from one batched call (`generations_before_after_edits`: the edited
    # models' prefill from the edited block on the base prefill's states); other models: the
    # base generations batched across edits up front, the edited ones per edit in the loop
    batched = model.kind == "causal" and bool(cfg.eval.get("batch_edits", True))
    gen = bool(cfg.eval.generate) and model.kind != "classifier"
    base_gens = None
    if gen and not batched:
        base_gens = generations_per_edit(model, model.params, [(r, adapts.get(r["record_id"], [])) for r in fails],
                                         extra_tokens=cfg.eval.gen_extra_tokens)
    text_flags = [with_text and i < cfg.eval.ppl_edits for i in range(len(fails))]
    per_edit, kept = [], []
    t_edit = t_score = t_gen = 0.0
    t_start = time.perf_counter()
    chunk_edits: list = []  # edit_each's edited models of the current chunk of EDIT_EACH_CHUNK records
    for i, row in enumerate(tqdm(fails, desc=f"eval {name}", disable=not cfg.progress)):
        t0 = time.perf_counter()
        if edit_each is None:
            edited = edit([row])
            _block(edited)
        else:  # every record's edit alone, computed a chunk at a time (memory: a chunk of edited kernels)
            if i % EDIT_EACH_CHUNK == 0:
                part = fails[i: i + EDIT_EACH_CHUNK]
                chunk_edits = list(edit_each(part))
                if len(chunk_edits) != len(part):
                    raise ValueError(f"{name}: edit_each returned {len(chunk_edits)} edited models for {len(part)} records")
                _block(chunk_edits)
            edited = chunk_edits[i % EDIT_EACH_CHUNK]
        t_edit += time.perf_counter() - t0
        m = {}
        if batched:
            kept.append(kept_edit(model.params, edited))
        else:
            t0 = time.perf_counter()
            m = evaluator.evaluate(i, edited, with_text=text_flags[i])
            t_score += time.perf_counter() - t0
        if cf_records is not None:
            cf = evaluate_counterfact(model, edited, [cf_records[row["record_id"]]], batch_size=cfg.eval.batch_size,
                                      progress=False)
            m.update({f"cf/{k}": cf[k] for k in CF_KEYS})
        if gen and not batched:
            m.update(generation_metrics(model, edited, row, adapts.get(row["record_id"], []), cfg, i, cf_records,
                                        base_gens[i]))
        per_edit.append(m)
    if batched and fails:
        t0 = time.perf_counter()
        for m, s in zip(per_edit, evaluator.evaluate_many(list(enumerate(kept)), with_text=text_flags)):
            m.update(s)
        t_score = time.perf_counter() - t0
        if gen:
            t0 = time.perf_counter()
            pairs = [(r, adapts.get(r["record_id"], [])) for r in fails]
            before, after = generations_before_after_edits(model, model.params, kept, pairs,
                                                           extra_tokens=cfg.eval.gen_extra_tokens,
                                                           edits_per_call=min(len(kept), 32))
            for i, (row, m, p) in enumerate(zip(fails, per_edit, kept)):
                m.update(generation_metrics(model, p, row, pairs[i][1], cfg, i, cf_records, before[i],
                                            edited_generations=after[i]))
            t_gen = time.perf_counter() - t0
    if keep:
        for m in per_edit:
            # the keep rows this edit broke, by id (per_edit's `keep_lost`): which facts, not only how many
            m["keep_lost"] = [passes["keep"][j]["id"] for j in m.pop("keep/lost")]
            m["dd_keep_acc"] = m["keep/acc_before"] - m["keep/acc_after"]
            for rel in keep_rels:
                m[f"dd_keep_acc_{rel}"] = m[f"keep_{rel}/acc_before"] - m[f"keep_{rel}/acc_after"]
    out: dict[str, Any] = {"edits": len(per_edit), "edit_seconds": t_edit / max(len(per_edit), 1)}
    # where the evaluation's time went: building the evaluator (the base side), applying the edits,
    # scoring them, generating (batched: before and after every edit), the rest (CounterFact, ...)
    total = time.perf_counter() - t_start
    out["eval_seconds"] = {"setup": t_start - t_setup, "edit": t_edit, "score": t_score, "generate": t_gen,
                           "other": total - t_edit - t_score - t_gen}
    keys = sorted({k for m in per_edit for k in m} - {"keep_lost"})
    for k in keys:
        vals = [m[k] for m in per_edit if k in m and m[k] is not None and np.isfinite(m[k])]
        out[k] = float(np.mean(vals)) if vals else None
    # each edit's own outcome (which edits failed, each one's keep drawdown): the means above hide them
    out["per_edit"] = [{"record_id": row["record_id"], "prompt": row["prompt"], "target": row.get("target"),
                        **{k: m[k] for k in PER_EDIT_KEYS + tuple(f"dd_keep_acc_{rel}" for rel in keep_rels) if k in m},
                        **({"keep_lost": m["keep_lost"]} if "keep_lost" in m else {})}
                       for row, m in zip(fails, per_edit)]
    if cf_records is not None and fails:
        out["cf/Score"] = harmonic_mean([np.nan if out.get(f"cf/{k}") is None else out[f"cf/{k}"] for k in ("ES", "PS", "NS")])
        before = evaluate_counterfact(model, model.params, [cf_records[r["record_id"]] for r in fails],
                                      batch_size=cfg.eval.batch_size, progress=False)
        out.update({f"cf/{k}_before": before[k] for k in (*CF_KEYS, "Score")})
    return out


def generation_metrics(model, edited, row: dict, adapt_rows: list[dict], cfg, i: int, cf_records,
                       base_generations: list[str] | None = None, edited_generations: list[str] | None = None) -> dict:
    """Generated answers (config.eval.generate) and, for the first config.eval.fluency_edits CounterFact
    edits, ROME's fluency on the record's generation_prompts (salem_jax.eval.generated).
    base_generations / edited_generations: the base / edited model's generations of the row and its
    rephrasings, if computed already."""
    if model.kind == "classifier" or not cfg.eval.generate:
        return {}
    m = edit_generation_metrics(model, model.params, edited, row, adapt_rows, extra_tokens=cfg.eval.gen_extra_tokens,
                                base_generations=base_generations, edited_generations=edited_generations)
    if cf_records is not None and i < cfg.eval.fluency_edits and cfg.eval.fluency_prompts > 0:
        prompts = list(cf_records[row["record_id"]].extra.get("generation_prompts") or [])[: cfg.eval.fluency_prompts]
        if prompts:
            m.update(generation_fluency_metrics(model, model.params, edited, prompts, max_new_tokens=cfg.eval.fluency_tokens))
    return m


def _main_process() -> bool:
    return parallel.is_main_process()


def _block(tree):
    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


# ----------------------------------------------------------------------------- the job


# ----------------------------------------------------------------------------- the job


def run_pipeline(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run the configured pipeline; returns the results dict also written to workdir/results.json."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    # -- 1. load: records, model, held-out text; refuse what cannot run before any costly step
    steps = many.parse_steps(cfg.eval.sequential) if cfg.eval.sequential else ()
    if steps:
        many.parse_modes(cfg.eval.sequential_modes)
    many.check_order_seed(cfg.eval.get("sequential_order_seed", many.ORDER_RECORD))
    if cfg.editor.get("extra_pass_per_group", 0) and not cfg.train_pass:
        raise ValueError(f"config.editor.extra_pass_per_group={cfg.editor.extra_pass_per_group} draws pass rows from "
                         "config.train_pass's rows, which is empty: set config.train_pass (e.g. "
                         "countries:region,currency,languages) or config.editor.extra_pass_per_group=0")
    scale = cfg.eval.get("mend_edit_scale", 1.0)
    if not (isinstance(scale, (int, float)) and np.isfinite(scale) and scale > 0):
        raise ValueError(f"config.eval.mend_edit_scale={scale!r}: give a finite number > 0 (1 = the trained editor's own edit)")
    check_retries(cfg.eval.get("mend_edit_retries", 0))
    check_energy(cfg.eval.get("mend_null_energy", 0.0), "config.eval.mend_null_energy")
    check_energy(cfg.editor.get("null_energy", 0.0), "config.editor.null_energy")
    check_editor_seed(cfg.editor.get("seed", EDITOR_SEED_TOP), "config.editor.seed")
    check_editor_seed(cfg.eval.get("keep_seed", EDITOR_SEED_TOP), "config.eval.keep_seed")
    if cfg.editor.get("null_energy", 0.0) and (isinstance(cfg.editor.get("null_tokens"), bool)
                                               or int(cfg.editor.get("null_tokens", 100_000)) < 1):
        raise ValueError(f"config.editor.null_tokens={cfg.editor.null_tokens!r}: give a number of tokens >= 1")
    if cfg.editor.get("null_energy", 0.0) and cfg.eval.get("mend_null_energy", 0.0):
        raise ValueError(f"config.editor.null_energy={cfg.editor.null_energy:g} and config.eval.mend_null_energy="
                         f"{cfg.eval.mend_null_energy:g}: an editor trained through a null-space projection already edits "
                         "through it; set one of them to 0")
    check_null_facts(cfg)
    if cfg.eval.get("mend_null_energy", 0.0) and int(cfg.eval.get("mend_null_tokens", 100_000)) < 1:
        raise ValueError(f"config.eval.mend_null_tokens={cfg.eval.mend_null_tokens!r}: give a number of tokens >= 1")
    records = timed(times, "read_records", read_records, cfg)
    model = timed(times, "load_model", load, cfg, records)
    say(f"model {model.name} ({model.arch}, {len(model.layers)} blocks) loaded in {times['load_model']:.1f}s")
    texts, text_note = held_out_text_for(model, cfg)
    methods = resolve_methods(Context(model=model, cfg=cfg, work=work, say=say, texts=tuple(texts), text_note=text_note))
    model, mesh = place_model(model, cfg)

    # -- 2. the edit set (reused when a previous run of the same config wrote it)
    es = timed(times, "edit_set", edit_set, model, records, cfg, work)
    say(es.summary())
    train_rows, val_rows = split_rows(es)
    if cfg.editor.get("own_pass_per_group", 0):
        say(own_pass_note(train_rows, cfg.editor.own_pass_per_group))
    many.check_enough_edits(steps, sum(r["group"] == "fail" for r in val_rows), "the val split")

    # -- 3. locate: the salient layer(s); the causal-traced layer when a method uses it
    profile = timed(times, "saliency", saliency, model, train_rows, cfg)
    if _main_process():
        (work / "profile.json").write_text(profile.to_json())
        plot_profile(profile, str(work / "profile.png"))
    say(f"saliency ({cfg.saliency.scorer}) chose {', '.join(profile.chosen)} in {times['saliency']:.1f}s")
    say(text_note)
    subjects = {r.id: r.subject for r in records}  # causal / rome: the edit set keeps no subjects
    tracing = tuple(m.name for m in methods if m.needs_trace(cfg))
    traced_layer, trace_info = None, None
    if tracing:
        traced_layer, trace_info = timed(times, "causal_trace", causal_trace_layer, model, train_rows, subjects, cfg,
                                         work, tracing)
        say(f"causal tracing of {len(trace_info['facts'])} train fail rows chose {traced_layer} "
            f"({trace_info['forward_passes']} forward passes, {trace_info['skipped_rows']} rows without their subject "
            f"in the prompt left out) in {times['causal_trace']:.1f}s")

    # -- 4. the keep set
    keep, keep_note = [], "no keep set (config.eval.keep)"
    if cfg.eval.keep:
        keep, keep_note = timed(times, "keep_set", keep_set, model, cfg,
                                exclude_prompts=[r["prompt"] for r in train_rows + val_rows])
        say(f"keep set: {keep_note}")

    # -- 4b. extra pass rows for the editors' training split (config.train_pass; disjoint from the keep set)
    train_pass: list[dict] = []
    if cfg.train_pass:
        train_pass, tp_note = timed(times, "train_pass", train_pass_set, model, cfg, train_rows, val_rows, keep)
        if cfg.editor.get("extra_pass_per_group", 0):
            # a per-group mix: pass_per_group edit-set pass rows + extra_pass_per_group of these
            train_pass = [dict(r, pass_pool="extra") for r in train_pass]
            tp_note += f" (their own pool: {cfg.editor.extra_pass_per_group} per edit group)"
        say(f"train pass: {tp_note}")

    # -- 4c. fact rows whose keys join the editor's null-space covariance (config.editor.null_facts)
    null_facts: list[dict] = []
    if cfg.editor.get("null_facts", ""):
        null_facts, nf_note = null_fact_rows(cfg, train_rows, val_rows, keep)
        say(f"null-space facts: {nf_note}")

    # -- 5. each method: prepare (train an editor, fit statistics), then evaluate on the val split
    ctx = Context(model=model, cfg=cfg, work=work, say=say, mesh=mesh, texts=tuple(texts), text_note=text_note,
                  subjects=subjects, train_rows=train_rows, val_rows=val_rows, keep_rows=list(keep),
                  null_fact_rows=null_facts,
                  data=prepare_splits(model, {"train": train_rows + train_pass, "val": val_rows}),
                  profile=profile, traced_layer=traced_layer, trace_info=trace_info)
    # CounterFact data: every edit is also scored with ROME's metrics on its own record
    cf_records = {r.id: r for r in records} if cfg.format == "counterfact" else None
    # zsRE portability questions (salem_jax.eval.portability) assume the counterfactual answer
    portability = portability_rows(records) if cfg.mode == "counterfactual" else None
    results: dict[str, Any] = {}
    training: dict[str, Any] = {}

    def report(stopped: dict | None = None) -> dict:
        # (a mode stopped at its first T has no results: left out of the plot and table)
        studies = {k: {mode: rs for mode, rs in v["many_edits"].items() if rs} for k, v in results.items()
                   if "many_edits" in v}
        studies = {k: v for k, v in studies.items() if v}
        if studies and _main_process():
            many.plot_many_edits(studies, work / "many_edits.png")
            lost = many.keep_lost_lines(studies)
            (work / "many_edits.md").write_text(many.summary_table(studies) + "\n" + (f"\n{lost}\n" if lost else ""))
        times["total"] = time.perf_counter() - t_all
        out = dict(
            config=json.loads(cfg.to_json_best_effort()), model=model.name, edit_set=es.info,
            profile=profile.to_dict(), chosen_layers=list(profile.chosen), methods=results, training=training,
            text=text_note, keep=keep_note, times=times, **({"stopped": stopped} if stopped else {}),
        )
        write_results(out, work)
        return out

    for i, method in enumerate(methods):
        try:
            results[method.name], training[method.name] = run_method(method, ctx, keep, cf_records, times,
                                                                      portability=portability)
        except many.NonFiniteEdit as e:
            # -- 6'. a non-finite edit in the many-edits study: write what was measured, then stop
            if e.partial is not None:
                results[method.name], training[method.name] = e.partial
            stopped = dict(method=method.name, mode=e.mode, edit=e.edit, row_id=e.row_id, leaves=list(e.leaves),
                           message=str(e), not_run=[m.name for m in methods[i + 1:]])
            report(stopped)
            say(f"stopped: {method.name}'s many-edits study ({e.mode}) at edit {e.edit} (val fail row {e.row_id!r}): "
                f"non-finite weights in {', '.join(e.leaves)}; the results so far are in {work / 'results.json'}"
                + (f"; not run: {', '.join(stopped['not_run'])}" if stopped["not_run"] else ""))
            raise

    # -- 6. report
    out = report()
    say(f"done in {times['total']:.0f}s; results in {work}")
    return out


def say(msg: str) -> None:
    print(f"[salem] {msg}", flush=True)


def timed(times: dict[str, float], key: str, fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), its wall-clock seconds recorded as times[key]."""
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    times[key] = time.perf_counter() - t
    return out


def held_out_text_for(model, cfg) -> tuple[list[str], str]:
    """The held-out texts of the perplexity drawdown (causal LMs only) and a note on them."""
    if model.kind == "causal":
        return held_out_texts(cfg)
    return [], f"held-out text perplexity applies to causal LMs only ({model.kind} model); DD is on pass rows"


def resolve_methods(ctx: Context) -> list[Method]:
    """The configured methods from the registry; unknown names, model kinds a method cannot edit and
    bad method settings are refused here, before any costly step. ctx: model, cfg, texts only."""
    methods = [method_registry.get(name) for name in ctx.cfg.methods]
    for m in methods:
        m.refuse_unsupported(ctx.model)
        m.check(ctx)
    return methods


def place_model(model, cfg):
    """(model, mesh): with cfg.mesh_model, the parameters sharded over a (data, mesh_model) mesh."""
    if not cfg.mesh_model:
        return model, None
    mesh = sharding.make_mesh(model=cfg.mesh_model)
    model = dataclasses.replace(model, params=place_base_params(model, model.params, mesh))
    say(f"parameters sharded over a {dict(mesh.shape)} mesh: {sharding.describe(model.params)}")
    return model, mesh


EDIT_SET_KEYS = ("model", "data", "format", "relation", "mode", "limit", "seed", "val_fraction", "skip_invalid")


def edit_set(model, records, cfg, work: Path):
    """The edit set of `records`: work/edit_set when a run of the same config (EDIT_SET_KEYS) wrote
    it, else built (scoring every record with the model) and written."""
    es_dir = work / "edit_set"
    stamp = jsonable({k: cfg[k] for k in EDIT_SET_KEYS})
    if (es_dir / "info.json").is_file():
        es = load_edit_set(es_dir)
        if es.info.get("pipeline") == stamp:
            return es
    es = build_edit_set(
        model, records, mode=cfg.mode, seed=cfg.seed, val_fraction=cfg.val_fraction,
        batch_size=cfg.score_batch, progress=cfg.progress, skip_invalid=cfg.skip_invalid,
    )
    es.info["pipeline"] = stamp
    if _main_process():  # every host builds the same edit set; one writes it
        save_edit_set(es, es_dir, overwrite=True)
    return es


def own_pass_note(train_rows: list[dict], own: int) -> str:
    """How many train fail rows have pass rows of their own record (config.editor.own_pass_per_group);
    an error before any costly step when none has."""
    per_record: dict[str, int] = {}
    for r in train_rows:
        if r["group"] == "pass":
            per_record[str(r["record_id"])] = per_record.get(str(r["record_id"]), 0) + 1
    counts = [per_record.get(str(r["record_id"]), 0) for r in train_rows if r["group"] == "fail"]
    if not any(counts):
        raise ValueError(
            f"config.editor.own_pass_per_group={own}: none of the train split's {len(counts)} fail rows has a pass "
            "row of its own record (same record_id; e.g. CounterFact's neighbourhood prompts): set it to 0"
        )
    full = sum(c >= own for c in counts)
    return (f"own pass rows (config.editor.own_pass_per_group={own}): {sum(c > 0 for c in counts)} of {len(counts)} "
            f"train fail rows have some, {full} have {own} or more (median {int(np.median(counts))} per record)")


def split_rows(es) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows); each split must have fail and pass rows."""
    train_rows, val_rows = es.rows("train"), es.rows("val")
    for split, rows, need in (("train", train_rows, ("fail", "pass")), ("val", val_rows, ("fail", "pass"))):
        groups = {r["group"] for r in rows}
        if not set(need) <= groups:
            raise ValueError(
                f"the {split} split has groups {sorted(groups)} but needs {', '.join(need)} rows "
                "(the editor trains on fail rows with a KL term on pass rows, and validates on both). "
                "Use more records (--config.limit) or another mode."
            )
    return train_rows, val_rows


def run_method(method: Method, ctx: Context, keep: list[dict], cf_records, times: dict,
               portability: dict | None = None) -> tuple[dict, dict]:
    """Prepare `method` and evaluate its edits on the val split: (results entry, training entry)."""
    layers = timed(times, f"layers_{method.name}", lambda: tuple(method.layers(ctx)))
    prepared = timed(times, f"prepare_{method.name}", method.prepare, ctx, layers)
    eval_rows = ctx.val_rows if prepared.eval_rows is None else prepared.eval_rows
    edit = functools.partial(prepared.edit, ctx.model.params)  # every edit starts from the base weights
    t = time.perf_counter()
    edit_each = None if prepared.edit_each is None else functools.partial(prepared.edit_each, ctx.model.params)
    res = evaluate_method(ctx.model, edit, eval_rows, list(ctx.texts), ctx.cfg, method.name, keep=keep,
                          cf_records=cf_records, portability=portability, edit_each=edit_each)
    res["layers"] = list(layers)
    if "edit_retries" in prepared.info:  # config.eval.mend_edit_retries: each val edit's applications, in order
        res["edit_retries"] = retry_summary(prepared.info["edit_retries"], res)
    if hasattr(prepared.info.get("null_projection"), "summary"):  # MEND edits projected (config.eval.mend_null_energy)
        prepared.info["null_projection"] = res["null_projection"] = prepared.info["null_projection"].summary()
    elif isinstance(prepared.info.get("null_projection"), dict):  # an editor trained through one (config.editor.null_energy)
        res["null_projection"] = prepared.info["null_projection"]
    if "null_facts" in prepared.info:  # the fact keys in that projection's covariance (config.editor.null_facts)
        res["null_facts"] = prepared.info["null_facts"]
    if ctx.cfg.eval.sequential:  # many edits on the same weights (salem_jax.eval.sequential)
        t_many = time.perf_counter()
        log = prepared.info.get("edit_retries")
        n0 = len(log["applications"]) if log else 0
        try:
            res["many_edits"] = many.pipeline_study(ctx.model, prepared.edit, many_edit_rows(ctx.val_rows, prepared),
                                                    keep, list(ctx.texts), ctx.cfg, method.name, ctx.work,
                                                    portability=portability)
        except many.NonFiniteEdit as e:  # the one-at-a-time results and the study so far go up with it
            res["many_edits"] = dict(e.study or {})
            res["many_edits_error"] = dict(mode=e.mode, edit=e.edit, row_id=e.row_id, leaves=list(e.leaves),
                                           message=str(e))
            times[f"many_edits_{method.name}"] = time.perf_counter() - t_many
            times[f"eval_{method.name}"] = time.perf_counter() - t
            e.partial = (res, prepared.info)
            raise
        if log:  # the study's edit calls (one per batch of each mode, in the order made): their applications
            res["many_edits_retries"] = {"max": int(log["max"]), "applications": log["applications"][n0:],
                                         "tried": log["tried"][n0:]}
        times[f"many_edits_{method.name}"] = time.perf_counter() - t_many
    if prepared.skipped_edits is not None:
        res["skipped_edits"] = len(prepared.skipped_edits)
        res["skipped_edit_rows"] = list(prepared.skipped_edits)
    times[f"eval_{method.name}"] = time.perf_counter() - t
    retried = (f"; {res['edit_retries']['retried']} of {res['edits']} edits applied again, {res['edit_retries']['kept']} "
               f"reached ({res['edit_retries']['option']}={res['edit_retries']['max']})" if "edit_retries" in res else "")
    say(f"{method.name}: EA {_fmt(res.get('ea'))}, adapt {_fmt(res.get('adapt_acc'))}, DD {_fmt(res.get('dd_acc'))}{retried}")
    return res, prepared.info


def retry_summary(log: dict, res: dict) -> dict:
    """config.eval.mend_edit_retries: the evaluation's edits were the first ones the method's edit
    functions made (`mend.retry.with_retries` logs every edit's applications, kept and tried, in order),
    one per val fail record, so the first len(per_edit) entries are theirs: each goes into its per_edit
    entry (`applications`: in the edit evaluated; `applications_tried`). The summary: how many edits were
    applied again, how many kept a retry (it reached the target), how many gave up (retried, but the
    first application evaluated), and the share reached by the first application (1 tried)."""
    per = res.get("per_edit") or []
    kept = [int(n) for n in log["applications"][: len(per)]]
    tried = [int(n) for n in log["tried"][: len(per)]]
    if len(kept) != len(per) or len(tried) != len(per):
        raise ValueError(f"edit retries: {len(log['applications'])} edits logged for {len(per)} evaluated edits")
    for m, n, t in zip(per, kept, tried):
        m["applications"], m["applications_tried"] = n, t
    return {"max": int(log["max"]), "option": log.get("option", "config.eval.mend_edit_retries"),
            "retried": sum(t > 1 for t in tried), "kept": sum(n > 1 for n in kept),
            "gave_up": sum(t > 1 and n == 1 for n, t in zip(kept, tried)),
            "reached_first": float(np.mean([t == 1 for t in tried])) if per else None,
            "applications_mean": float(np.mean(kept)) if per else None}


def many_edit_rows(val_rows: list[dict], prepared) -> list[dict]:
    """The val rows of the many-edits study: every val fail row the method can edit
    (`Prepared.can_edit`), not only the first config.eval.max_edits the one-at-a-time evaluation takes."""
    if prepared.can_edit is None:
        return list(val_rows)
    return [r for r in val_rows if r["group"] != "fail" or prepared.can_edit(r)]


def write_results(out: dict, work: Path) -> None:
    """results.json, results.md and training.png (process 0 only); prints the table."""
    table = results_table(out)
    if _main_process():  # results from process 0; orbax checkpoints are written by every host
        (work / "results.json").write_text(json.dumps(jsonable(out), indent=2))
        (work / "results.md").write_text(table + "\n")
        _plot_training(work, list(out["training"]), work / "training.png")
    print(table, flush=True)


# ----------------------------------------------------------------------------- reporting

COLUMNS = (
    ("ea", "EA"),
    ("ea_token", "EA (tokens)"),
    ("adapt_acc", "adapt acc"),
    ("dd_acc", "DD (pass acc)"),
    ("dd_keep_acc", "DD (keep acc)"),
    ("locality", "locality"),
    ("dd_ppl_text_rel", "DD (text ppl, rel)"),
    ("cf/ES", "ES"),
    ("cf/PS", "PS"),
    ("cf/NS", "NS"),
    ("cf/Score", "CF score"),
    ("portability", "portability"),
    ("gen/fail_starts_after", "gen starts"),
    ("gen/fail_contains_after", "gen contains"),
    ("gen/adapt_starts_after", "gen starts (rephr.)"),
    ("gen/fluency_after", "fluency"),
)
# shown only when measured; the base row reads these from the "_before" twin (BEFORE_KEYS)
OPTIONAL_COLUMNS = ("dd_keep_acc", "cf/ES", "cf/PS", "cf/NS", "cf/Score", "portability", "gen/fail_starts_after",
                    "gen/fail_contains_after", "gen/adapt_starts_after", "gen/fluency_after")
BEFORE_KEYS = {"portability": "portability_before", "gen/fail_starts_after": "gen/fail_starts_before",
               "gen/fail_contains_after": "gen/fail_contains_before", "gen/adapt_starts_after": "gen/adapt_starts_before",
               "gen/fluency_after": "gen/fluency_before"}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def results_table(out: dict) -> str:
    """The before/after table as markdown: one row for the base model, one per method."""
    methods = out["methods"]
    # keep-set and CounterFact columns only when measured (config.eval.keep, CounterFact data)
    columns = [(k, c) for k, c in COLUMNS
               if k not in OPTIONAL_COLUMNS or any(m.get(k) is not None for m in methods.values())]
    lines = [
        f"model {out['model']}, salient layers {', '.join(out['chosen_layers'])} "
        f"(scorer {out['profile']['scorer']}; each method's edited layers in the table), val edits per method: "
        + ", ".join(f"{k} {v['edits']}" + (f" ({v['skipped_edits']} skipped: no subject in the prompt)"
                                            if v.get("skipped_edits") else "") for k, v in methods.items()),
        "",
        "| method | layers | " + " | ".join(c for _, c in columns) + " | editor steps | s/edit |",
        "|---|---|" + "---|" * len(columns) + "---|---|",
    ]
    if methods:
        any_m = next(iter(methods.values()))
        base = {
            "ea": any_m.get("fail/acc_before"),
            "ea_token": any_m.get("fail/token_acc_before"),
            "adapt_acc": any_m.get("adapt/acc_before"),
            "dd_acc": 0.0,
            "dd_keep_acc": 0.0,
            "locality": 1.0,
            "dd_ppl_text_rel": 0.0,
            **{k: any_m.get(f"{k}_before") for k in OPTIONAL_COLUMNS if k.startswith("cf/")},
            **{k: any_m.get(b) for k, b in BEFORE_KEYS.items()},
        }
        lines.append("| base (no edit) | - | " + " | ".join(_fmt(base[k]) for k, _ in columns) + " | - | - |")
    for name, m in methods.items():
        tr = out["training"].get(name, {})
        steps = tr.get("steps", "-")
        if tr.get("evaluated_step") not in (None, steps):  # the best-validation checkpoint, not the last
            steps = f"{tr['evaluated_step']} (best of {steps})"
        lines.append(
            f"| {name} | {', '.join(m['layers'])} | " + " | ".join(_fmt(m.get(k)) for k, _ in columns)
            + f" | {steps} | {m['edit_seconds']:.2f} |"
        )
    stopped = out.get("stopped")
    if stopped:  # a non-finite edit in a many-edits study ended the run (pipeline.run_pipeline)
        lines.append(f"\nSTOPPED: {stopped['method']}'s many-edits study, mode {stopped['mode']}, at edit "
                     f"{stopped['edit']} (val fail row {stopped['row_id']!r}): {stopped['message']}; the rows above and "
                     f"many_edits_{stopped['method']}.json hold the results measured before it"
                     + (f"; methods not run: {', '.join(stopped['not_run'])}" if stopped["not_run"] else ""))
    for name, m in methods.items():  # config.eval.mend_edit_retries: what the retries did, beside the table
        r = m.get("edit_retries")
        if r:
            lines.append(f"\n{name}: {r['retried']} of {m['edits']} edits applied again while their own prompt missed the "
                         f"target ({r.get('option', 'config.eval.mend_edit_retries')}={r['max']}), {r['kept']} of them reached it (the others "
                         f"evaluated at their first application); reached by the first application: {_fmt(r['reached_first'])}")
    return "\n".join(lines)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if dataclasses.is_dataclass(x):
        return jsonable(dataclasses.asdict(x))
    return x


def _plot_training(work: Path, methods: list[str], path: Path) -> None:
    """Validation EA, DD and loss against editor steps, from each editor's metrics.jsonl."""
    import matplotlib  # heavy, and only the plots need it; the Agg backend must be set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {}
    for m in methods:
        f = work / f"editor_{m}" / "metrics.jsonl"
        if f.is_file():
            recs = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
            val = [r for r in recs if r.get("split") == "val"]
            if val:
                series[m] = val
    if not series:
        return
    panels = (("edit_acc", "val edit accuracy", "EA vs editor steps"),
              ("drawdown", "val drawdown (pass acc)", "DD vs editor steps"),
              ("loss", "val loss", "validation loss"))
    fig, ax = plt.subplots(1, len(panels), figsize=(15, 3.5))
    for m, recs in series.items():
        steps = [r.get("step") for r in recs]
        for a, (key, _, _) in zip(ax, panels):
            vals = [r.get(key) for r in recs]
            if any(v is not None for v in vals):
                a.plot(steps, [np.nan if v is None else v for v in vals], marker="o", label=m)
    for a, (_, ylabel, title) in zip(ax, panels):
        a.set(xlabel="editor step", ylabel=ylabel, title=title)
    ax[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

