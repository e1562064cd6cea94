"""The whole SaLEM pipeline as one function: edit set -> salient layer -> editor -> evaluation.

`run_pipeline(cfg, workdir)` is what every experiment in `experiments/` calls; `cfg` is an
`ml_collections.ConfigDict` laid out like `default_config()`. Steps:

1. load the model (`load_model`, or a tiny random one for `tiny` configs);
2. read the records and build the edit set (fail / adapt / pass, 90:10 train/val by record);
3. saliency profile on the train split (paper eq. 2-5) -> the edit layer(s);
4. for each method in `cfg.methods`, produce an *edit function* (request rows -> edited params):
   `salem` (MEND editor on the top-K salient layers), `mend_fixed` (MEND on the last three blocks,
   as MEND does), `ft` / `ft_kl` (fine-tuning the salient layer, without / with a KL constraint),
   `causal` (MEND on the layer chosen by ROME's causal tracing of train fail rows) and `rome`
   (ROME's rank-one edit of that layer's MLP output projection, causal LMs only);
5. evaluate every method on the val split, one edit at a time (as MEND and the paper report):
   edit accuracy on the fail row, adapt accuracy on its rephrasings, drawdown / locality on the
   val pass rows, and perplexity change on held-out text for the first `eval.ppl_edits` edits;
6. write `results.json`, `results.md` and plots into `workdir`.

Every intermediate result is written as it is produced (edit set, profile, editor checkpoints),
so a killed run resumes: the editor from its last checkpoint, the rest recomputed (cheap).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "salem"
    c.model = "smollm2-135m"  # a load_model name/path, or "tiny-ARCH" (gpt2, gpt_neo, t5, bart, bert, llama)
    c.dtype = "float32"
    c.data = "countries"  # "countries", a known data-file name (zsre, counterfact, ...) or a path
    c.format = "countries"  # reader format: countries | zsre | counterfact | fever | nli | text
    c.relation = "capital"  # countries only
    c.mode = "correction"  # correction | counterfactual
    c.limit = 0  # records to read (0 = all)
    c.data_dir = ""  # '' = SALEM_JAX_DATA or ../shared/data
    c.seed = 0
    c.val_fraction = 0.1
    c.score_batch = 16
    c.skip_invalid = False  # True: records too long for the model are skipped (and counted) instead of an error
    c.saliency = ml_collections.ConfigDict(
        # groups: which edit-set groups are profiled (fail is needed for the choice; pass adds the
        # contrast scorer's reference; adapt is reported only); at most max_examples rows each
        dict(scorer="salem", top_k=1, part="mlp", micro_batch=8, max_examples=64, select_group="fail",
             groups=("fail", "adapt", "pass"))
    )
    c.editor = ml_collections.ConfigDict(
        # A CPU budget (the SmolLM2 experiments), not the paper's schedule (experiments.common.
        # paper_editor): an optimiser update after every edit group (effective_batch 1) at Adam lr
        # 1e-4. On SmolLM2 capitals this reached val fail accuracy 0.42 after 50 steps, where
        # MEND's batch of 10 groups per update reached 0.26 after 100 and 0.32 after 300 steps
        # (30 updates); lr 1e-3, or lr_lr 1e-3, or edit_lr_init 1e-2 made the first updates blow
        # up the KL term (edits then break the pass rows).
        dict(
            steps=150,
            lr=1e-4,
            lr_lr=1e-4,
            rank=1920,
            n_hidden=1,
            edit_lr_init=1e-4,
            c_fail=0.1,
            effective_batch=1,
            batch_size=0,  # 0 = one group per device
            adapt_per_edit=2,
            val_every=50,
            val_groups=32,
            patience=1000,
            checkpoint_every=50,
        )
    )
    c.methods = ("salem",)
    # 0: the model replicated on every device, the editor step data parallel (1-D mesh).
    # N >= 1: the model's weights sharded over a (data, N) mesh of all devices (salem_jax.sharding:
    # FSDP, MLPs tensor parallel over "model" when N > 1) for saliency, training and evaluation.
    c.mesh_model = 0
    c.fixed_layers = 3  # mend_fixed: the last N blocks
    c.ft = ml_collections.ConfigDict(dict(steps=10, lr=1e-3, kl_weight=1.0))
    # causal tracing (methods causal / rome): up to `facts` train fail rows with the subject in the prompt
    c.trace = ml_collections.ConfigDict(dict(facts=8, n_noise=10, restorations_per_call=8))
    # ROME (method rome): layer "" = the causal-traced one; covariance held_out = key statistics of the
    # held-out texts (eval.text), identity = none; the rest are ROMEConfig's knobs (ROME's GPT-2 XL values)
    c.rome = ml_collections.ConfigDict(
        dict(layer="", covariance="held_out", v_steps=20, v_lr=0.5, kl_factor=0.0625, weight_decay=0.5,
             clamp_norm_factor=4.0, ridge=1e-3)
    )
    c.eval = ml_collections.ConfigDict(
        dict(max_edits=20, max_pass=48, ppl_edits=5, text="wikitext", n_texts=8, text_window=128, batch_size=8,
             # a held-out keep set (salem_jax.eval.keep): '' = none; "countries:REL,REL" = those
             # relations of the country data; else a data name/path read with keep_format ('' = format).
             # Up to max_keep rows the base model gets right; every edit reports dd_keep_acc on them.
             keep="", keep_format="", max_keep=48)
    )
    c.progress = True
    return c


# ----------------------------------------------------------------------------- steps


def load(cfg, records=None) -> Any:
    """The configured model; classifiers get as many classes as the records' label set."""
    from salem_jax.models import hf, llama, load_model

    labels = records[0].labels if records else ()
    kw = {"num_labels": len(labels)} if labels else {}
    if cfg.model.startswith("tiny-"):  # tiny random models for the `tiny` configs and tests
        arch = cfg.model[len("tiny-") :]
        if arch == "llama":
            return llama.tiny_llama(seed=cfg.seed)
        return hf.tiny(arch, seed=cfg.seed, **kw)
    return load_model(cfg.model, dtype=cfg.dtype, **kw)


def read_records(cfg):
    from salem_jax.data import paths, readers
    from salem_jax.data.countries import country_records

    limit = cfg.limit or None
    if cfg.format == "countries":
        recs = country_records(cfg.relation, seed=cfg.seed)
        return recs[:limit] if limit else recs
    path = cfg.data
    if not os.path.exists(path):
        path = str(paths.find_data_file(cfg.data, cfg.data_dir or None))
    recs = readers.read_records(path, cfg.format, limit=limit)
    if cfg.format == "text":
        recs = text_edits(recs)
    return recs


def text_edits(recs):
    """WikiText as MEND uses it: each edit teaches the model a paragraph's real continuation
    (target_new = the continuation, so the counterfactual builder makes every record an edit);
    locality is the next paragraph with its own continuation."""
    from salem_jax.data.records import RecordList

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
    from salem_jax.data import paths, readers

    if not cfg.eval.text or cfg.eval.n_texts <= 0:
        return [], "perplexity on held-out text not requested"
    try:
        path = cfg.eval.text if os.path.exists(cfg.eval.text) else paths.find_data_file(cfg.eval.text, cfg.data_dir or None)
    except Exception as e:  # reported in the results, never silently
        return [], f"no held-out text ({e}); text perplexity drawdown not measured"
    # the LAST paragraphs of the file: the wikitext experiments edit its first ones
    texts = list(readers.read_text(path))[-cfg.eval.n_texts :]
    return texts, f"the last {len(texts)} paragraphs of {path}"


def keep_set(model, cfg, exclude_prompts=()) -> tuple[list[dict], str]:
    """The held-out keep rows of `cfg.eval.keep` (see salem_jax.eval.keep) and a note on them."""
    from salem_jax.data import paths, readers
    from salem_jax.data.countries import country_records
    from salem_jax.eval.keep import keep_rows

    spec = cfg.eval.keep
    if not spec:
        return [], "no keep set (config.eval.keep)"
    if spec.startswith("countries:"):
        relations = [r for r in spec[len("countries:") :].split(",") if r]
        if not relations:
            raise ValueError(f"config.eval.keep={spec!r}: name the relations after 'countries:', e.g. countries:region,currency")
        records, source = country_records(relations, seed=cfg.seed), f"country {', '.join(relations)} facts"
    else:
        path = spec if os.path.exists(spec) else str(paths.find_data_file(spec, cfg.data_dir or None))
        fmt = cfg.eval.keep_format or cfg.format
        records, source = readers.read_records(path, fmt), f"{path} ({fmt})"
    rows = keep_rows(model, records, max_rows=cfg.eval.max_keep, seed=cfg.seed, batch_size=cfg.eval.batch_size,
                     exclude_prompts=exclude_prompts, progress=cfg.progress)
    return rows, f"{len(rows)} rows of {source} the base model gets right (of {len(records)} records)"


def saliency(model, rows: list[dict], cfg):
    from salem_jax.data.edit_set import edit_set_batches, sample_by_group
    from salem_jax.saliency import saliency_profile

    wanted = set(cfg.saliency.groups) | {cfg.saliency.select_group}
    chosen = sample_by_group(rows, cfg.saliency.max_examples, cfg.seed, wanted)
    m = cfg.saliency.micro_batch
    data = [(b, [r["group"] for r in chunk]) for b, chunk in edit_set_batches(model, chosen, m)]
    return saliency_profile(
        model,
        model.params,
        data,
        scorer=cfg.saliency.scorer,
        part=cfg.saliency.part,
        top_k=cfg.saliency.top_k,
        select_group=cfg.saliency.select_group,
        micro_batch=m,
        progress=cfg.progress,
    )


def train_config(cfg):
    from salem_jax.mend.editor import EditorConfig
    from salem_jax.mend.train import TrainConfig

    e = cfg.editor
    return TrainConfig(
        editor=EditorConfig(rank=e.rank, n_hidden=e.n_hidden, edit_lr_init=e.edit_lr_init),
        adapt_per_edit=e.adapt_per_edit,
        batch_size=e.batch_size or None,
        effective_batch=e.effective_batch,
        c_fail=e.c_fail,
        lr=e.lr,
        lr_lr=e.lr_lr,
        max_steps=e.steps,
        val_every=e.val_every,
        val_groups=e.val_groups,
        patience=e.patience,
        checkpoint_every=e.checkpoint_every,
        seed=cfg.seed,
    )


def train_mend(model, data, layers: tuple[str, ...], cfg, workdir: Path, mesh=None):
    """Train (or resume) a MEND editor on the MLP weights of `layers`; returns (TrainedEditor, TrainResult).

    The editor returned is the checkpoint with the lowest validation loss (MEND's protocol, and
    `salem edit`'s default), not necessarily the last step: `editor.step` says which.
    mesh: None = all devices on a 1-D data mesh; a `sharding.make_mesh` mesh when the model's
    parameters are sharded on it (`cfg.mesh_model`)."""
    from salem_jax.mend.apply import TrainedEditor, load_editor
    from salem_jax.mend.train import train_editor

    weights = model.layers.weights(list(layers), part="mlp")
    result = train_editor(model, data, weights, train_config(cfg), workdir, mesh=mesh, progress=cfg.progress)
    if result.best_step is not None and result.best_step != result.step:
        return load_editor(workdir, model, step=int(result.best_step)), result
    editor = TrainedEditor(
        spec=result.spec, params=result.params, state=result.norm, model_name=model.name, step=result.step
    )
    return editor, result


def mend_edit_fn(model, editor) -> Callable[[list[dict]], Any]:
    from salem_jax.mend.apply import apply_edits

    def edit(rows):
        reqs = [dict(prompt=r["prompt"], target=_target(model, r), text_pair=r.get("text_pair", "")) for r in rows]
        return apply_edits(model, editor, reqs, progress=False)

    return edit


def _target(model, row):
    return row["label"] if model.kind == "classifier" else row["target"]


def ft_edit_fn(model, layers: tuple[str, ...], cfg, kl: bool, pass_rows: list[dict]) -> Callable:
    from salem_jax.baselines.finetune import FTConfig, finetune
    from salem_jax.data.tokenize import encode

    weights = model.layers.weights(list(layers), part="mlp")
    fc = FTConfig(steps=cfg.ft.steps, lr=cfg.ft.lr, kl_weight=cfg.ft.kl_weight if kl else 0.0)
    loc = None
    if kl and pass_rows:
        rs = pass_rows[: cfg.eval.batch_size]
        loc = encode(model, [r["prompt"] for r in rs], [_target(model, r) for r in rs],
                     text_pairs=_pairs(model, rs))

    def edit(rows):
        b = encode(model, [r["prompt"] for r in rows], [_target(model, r) for r in rows], text_pairs=_pairs(model, rows))
        return finetune(model, model.params, weights, b, loc_batch=loc, config=fc, progress=False)

    return edit


def _pairs(model, rows):
    return [r.get("text_pair", "") for r in rows] if model.kind == "classifier" and any(r.get("text_pair") for r in rows) else None


METHODS = ("salem", "salem3", "mend_fixed", "ft", "ft_kl", "causal", "rome")
ROME_COVARIANCES = ("held_out", "identity")


def check_methods(model, cfg) -> None:
    """Fail before any costly step: unknown method names, and methods this kind of model cannot run."""
    for m in cfg.methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r} in config.methods; choose from {', '.join(METHODS)}")
    if "causal" in cfg.methods and model.kind == "classifier":
        raise ValueError(
            f"method 'causal' chooses its layer by causal tracing, which needs a generated answer (causal LMs, "
            f"encoder blocks of seq2seq models); {model.name!r} is a classifier: drop 'causal' from config.methods"
        )
    if "rome" in cfg.methods:
        if model.kind != "causal":
            raise ValueError(
                f"method 'rome' (ROME's rank-one edit) supports causal LMs only; {model.name!r} is a {model.kind} "
                "model: drop 'rome' from config.methods"
            )
        if cfg.rome.layer and cfg.rome.layer not in model.layers.names():
            raise ValueError(f"config.rome.layer {cfg.rome.layer!r} is not a layer of {model.name!r}; "
                             f"layers are {', '.join(model.layers.names())} ('' = the causal-traced one)")
        if cfg.rome.covariance not in ROME_COVARIANCES:
            raise ValueError(f"config.rome.covariance {cfg.rome.covariance!r}: choose from {', '.join(ROME_COVARIANCES)}")


def needs_trace(cfg) -> tuple[str, ...]:
    """The configured methods that use the causal-traced layer."""
    return tuple(m for m in cfg.methods if m == "causal" or (m == "rome" and not cfg.rome.layer))


def causal_trace_layer(model, train_rows: list[dict], subjects: dict[str, str], cfg, work: Path,
                       methods: tuple[str, ...]) -> tuple[str, dict]:
    """ROME's layer choice: causal-trace (last subject token) up to `cfg.trace.facts` train fail rows
    whose subject occurs in their prompt; writes work/profile_causal.json and .png.
    Returns (chosen layer, summary for the results)."""
    from salem_jax.locate.trace_rows import rows_with_subject, trace_edit_rows

    usable, skipped = rows_with_subject(train_rows, subjects, "fail")
    if not usable:
        raise ValueError(
            f"method(s) {', '.join(methods)} need causal tracing, but none of the {len(skipped)} train fail rows "
            f"has a subject (field 'subject' of the {cfg.format!r} records from {cfg.data!r}) that occurs in its "
            "prompt; use records with subjects or set config.rome.layer for rome"
        )
    t = time.perf_counter()
    prof = trace_edit_rows(
        model, model.params, train_rows, subjects, group="fail", max_facts=cfg.trace.facts or None,
        select="last_subject", n_noise=cfg.trace.n_noise, restorations_per_call=cfg.trace.restorations_per_call,
        seed=cfg.seed, progress=cfg.progress,
    )
    if _main_process():
        (work / "profile_causal.json").write_text(prof.to_json())
        _plot_profile(prof, work / "profile_causal.png")
    info = dict(
        layer=prof.chosen[0], facts=list(prof.extra["fact_rows"]), forward_passes=prof.extra["forward_passes"],
        sequences=prof.extra["sequences"], n_noise=prof.extra["n_noise"], select="last_subject",
        skipped_rows=len(skipped), skipped_row_ids=list(skipped), profile="profile_causal.json",
        seconds=time.perf_counter() - t,
    )
    return prof.chosen[0], info


def rome_config(cfg):
    from salem_jax.baselines.rome import ROMEConfig

    r = cfg.rome
    return ROMEConfig(v_steps=r.v_steps, v_lr=r.v_lr, kl_factor=r.kl_factor, weight_decay=r.weight_decay,
                      clamp_norm_factor=r.clamp_norm_factor, ridge=r.ridge)


def rome_edit_fn(model, layer: str, cov, cfg, subjects: dict[str, str]) -> Callable:
    """Edit function of ROME on `layer`'s MLP output projection: each row (prompt -> target, the
    record's subject) is one rank-one edit; several rows are applied one after another."""
    from salem_jax.baselines.rome import rome_edit
    from salem_jax.locate.trace_rows import subject_in_prompt

    rc = rome_config(cfg)

    def edit(rows):
        params = model.params
        for r in rows:
            s = subject_in_prompt(r["prompt"], subjects.get(r["record_id"], ""))
            if s is None:
                raise ValueError(f"ROME: row {r['id']!r}: the subject of record {r['record_id']!r} "
                                 f"({subjects.get(r['record_id'], '')!r}) does not occur in the prompt {r['prompt']!r}")
            params = rome_edit(model, params, layer, r["prompt"], s, r["target"], cov=cov, config=rc,
                               progress=False).params
        return params

    return edit


def rome_val_rows(val_rows: list[dict], subjects: dict[str, str], max_edits: int) -> tuple[list[dict], list[str]]:
    """The val rows ROME is evaluated on: the same first `max_edits` fail rows as every other method,
    less those whose subject is unknown or not in the prompt (their ids are the second item); no
    later row takes a skipped one's place, so ROME's edits are a subset of the others'."""
    from salem_jax.locate.trace_rows import rows_with_subject

    fails = [r for r in val_rows if r["group"] == "fail"][:max_edits]
    usable, skipped = rows_with_subject(fails, subjects, "fail")
    keep = {id(r) for r, _ in usable}
    return [r for r in val_rows if r["group"] != "fail" or id(r) in keep], skipped


def rome_method(model, layer: str, val_rows, texts, text_note: str, subjects, cfg):
    """(edit function, training summary, val rows to evaluate, skipped val fail row ids) of ROME."""
    from salem_jax.baselines.rome import key_covariance, rome_weight

    t = time.perf_counter()
    if cfg.rome.covariance == "held_out":
        if not texts:
            raise ValueError(f"method 'rome': config.rome.covariance='held_out' needs held-out text, but: {text_note}")
        cov = key_covariance(model, model.params, layer, texts, window=cfg.eval.text_window,
                             batch_size=cfg.eval.batch_size, progress=cfg.progress)
        cov_note = f"key statistics of the {len(texts)} held-out texts ({text_note})"
    else:
        cov, cov_note = None, "identity (config.rome.covariance='identity')"
    eval_rows, skipped = rome_val_rows(val_rows, subjects, cfg.eval.max_edits)
    info = dict(
        layers=[layer], weight=rome_weight(model, layer).path, steps=cfg.rome.v_steps, covariance=cov_note,
        layer_from="config.rome.layer" if cfg.rome.layer else "causal tracing", seconds=time.perf_counter() - t,
        skipped_edits=len(skipped),
    )
    return rome_edit_fn(model, layer, cov, cfg, subjects), info, eval_rows, skipped


CF_KEYS = ("ES", "EM", "PS", "PM", "NS", "NM")  # ROME's CounterFact metrics, per edit


def evaluate_method(model, edit: Callable, val_rows: list[dict], texts: list[str], cfg, name: str,
                    keep: list[dict] = (), cf_records: dict | None = None) -> dict:
    """Edit each val fail record on its own (base weights each time); average the per-edit metrics.

    The base model's scores on the pass rows, the keep rows (`keep_set`) and held-out text are
    computed once and reused; the fail row and its rephrasings are scored before and after each
    edit. With keep rows, `dd_keep_acc` is their accuracy before minus after. With `cf_records`
    (record id -> CounterFact record, for CounterFact data) each edit is also scored with ROME's
    metrics on its own record (salem_jax.eval.counterfact): `cf/ES`, `cf/EM`, `cf/PS`, `cf/PM`,
    `cf/NS`, `cf/NM` averaged over edits as ROME's summary does, `cf/Score` their harmonic mean,
    and the same on the base model as `cf/*_before`."""
    from tqdm import tqdm

    from salem_jax.eval.counterfact import evaluate_counterfact, harmonic_mean
    from salem_jax.eval.metrics import base_scores, evaluate_edit

    fails = [r for r in val_rows if r["group"] == "fail"][: cfg.eval.max_edits]
    adapts: dict[str, list[dict]] = {}
    for r in val_rows:
        if r["group"] == "adapt":
            adapts.setdefault(r["record_id"], []).append(r)
    passes = {"pass": [r for r in val_rows if r["group"] == "pass"][: cfg.eval.max_pass]}
    if keep:
        passes["keep"] = list(keep)
    kw = dict(batch_size=cfg.eval.batch_size, text_window=cfg.eval.text_window, progress=False)
    base_pass = base_scores(model, model.params, passes, **kw)
    base_text = base_scores(model, model.params, passes, texts=texts, **kw) if texts and cfg.eval.ppl_edits else None
    # the edit's own rows (1 fail row, a few rephrasings) in batches of their size, not padded to
    # eval.batch_size: the same numbers (rows are independent) at a fraction of the work
    own_batch = min(cfg.eval.batch_size, 1 << (max([1] + [len(v) for v in adapts.values()]) - 1).bit_length())
    per_edit = []
    t_edit = 0.0
    for i, row in enumerate(tqdm(fails, desc=f"eval {name}", disable=not cfg.progress)):
        t0 = time.perf_counter()
        edited = edit([row])
        _block(edited)
        t_edit += time.perf_counter() - t0
        own = {"fail": [row]}
        if adapts.get(row["record_id"]):
            own["adapt"] = adapts[row["record_id"]]
        m = evaluate_edit(model, model.params, edited, own, **{**kw, "batch_size": own_batch})
        with_text = base_text is not None and i < cfg.eval.ppl_edits
        m.update(
            evaluate_edit(
                model, model.params, edited, passes, texts=texts if with_text else None,
                base=base_text if with_text else base_pass, **kw,
            )
        )
        if keep:
            m["dd_keep_acc"] = m["keep/acc_before"] - m["keep/acc_after"]
        if cf_records is not None:
            cf = evaluate_counterfact(model, edited, [cf_records[row["record_id"]]], batch_size=cfg.eval.batch_size,
                                      progress=False)
            m.update({f"cf/{k}": cf[k] for k in CF_KEYS})
        per_edit.append(m)
    out: dict[str, Any] = {"edits": len(per_edit), "edit_seconds": t_edit / max(len(per_edit), 1)}
    keys = sorted({k for m in per_edit for k in m})
    for k in keys:
        vals = [m[k] for m in per_edit if k in m and m[k] is not None and np.isfinite(m[k])]
        out[k] = float(np.mean(vals)) if vals else None
    if cf_records is not None and fails:
        out["cf/Score"] = harmonic_mean([np.nan if out.get(f"cf/{k}") is None else out[f"cf/{k}"] for k in ("ES", "PS", "NS")])
        before = evaluate_counterfact(model, model.params, [cf_records[r["record_id"]] for r in fails],
                                      batch_size=cfg.eval.batch_size, progress=False)
        out.update({f"cf/{k}_before": before[k] for k in (*CF_KEYS, "Score")})
    return out


def _main_process() -> bool:
    from salem_jax import parallel

    return parallel.is_main_process()


def _block(tree):
    import jax

    jax.tree.map(lambda x: x.block_until_ready() if hasattr(x, "block_until_ready") else x, tree)


# ----------------------------------------------------------------------------- the job


def run_pipeline(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Run the configured pipeline; returns the results dict also written to workdir/results.json."""
    from salem_jax.data.edit_set import build_edit_set, load_edit_set, save_edit_set
    from salem_jax.mend.train import prepare_splits

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    def say(msg):
        print(f"[salem] {msg}", flush=True)

    t = time.perf_counter()
    records = read_records(cfg)
    times["read_records"] = time.perf_counter() - t
    t = time.perf_counter()
    model = load(cfg, records)
    times["load_model"] = time.perf_counter() - t
    say(f"model {model.name} ({model.arch}, {len(model.layers)} blocks) loaded in {times['load_model']:.1f}s")
    check_methods(model, cfg)
    mesh = None
    if cfg.mesh_model:
        from salem_jax import sharding
        from salem_jax.mend.train import place_base_params

        mesh = sharding.make_mesh(model=cfg.mesh_model)
        model = dataclasses.replace(model, params=place_base_params(model, model.params, mesh))
        say(f"parameters sharded over a {dict(mesh.shape)} mesh: {sharding.describe(model.params)}")

    # 1. edit set (reused when a previous run of the same config wrote it)
    es_dir = work / "edit_set"
    stamp = {k: cfg[k] for k in ("model", "data", "format", "relation", "mode", "limit", "seed", "val_fraction", "skip_invalid")}
    t = time.perf_counter()
    es = None
    if (es_dir / "info.json").is_file():
        es = load_edit_set(es_dir)
        if es.info.get("pipeline") != _jsonable(stamp):
            es = None
    if es is None:
        es = build_edit_set(
            model, records, mode=cfg.mode, seed=cfg.seed, val_fraction=cfg.val_fraction,
            batch_size=cfg.score_batch, progress=cfg.progress, skip_invalid=cfg.skip_invalid,
        )
        es.info["pipeline"] = _jsonable(stamp)
        if _main_process():  # every host builds the same edit set; one writes it
            save_edit_set(es, es_dir, overwrite=True)
    times["edit_set"] = time.perf_counter() - t
    say(es.summary())
    train_rows, val_rows = es.rows("train"), es.rows("val")
    for split, rows, need in (("train", train_rows, ("fail", "pass")), ("val", val_rows, ("fail", "pass"))):
        groups = {r["group"] for r in rows}
        if not set(need) <= groups:
            raise ValueError(
                f"the {split} split has groups {sorted(groups)} but needs {', '.join(need)} rows "
                "(the editor trains on fail rows with a KL term on pass rows, and validates on both). "
                "Use more records (--config.limit) or another mode."
            )

    # 2. the salient layer(s)
    t = time.perf_counter()
    profile = saliency(model, train_rows, cfg)
    times["saliency"] = time.perf_counter() - t
    if _main_process():
        (work / "profile.json").write_text(profile.to_json())
        _plot_profile(profile, work / "profile.png")
    say(f"saliency ({cfg.saliency.scorer}) chose {', '.join(profile.chosen)} in {times['saliency']:.1f}s")
    top1 = profile.chosen[:1]
    order = np.argsort(-np.asarray(profile.scores[profile.select_group]))
    top3 = tuple(profile.layers[i] for i in order[:3])

    # 3. methods
    if model.kind == "causal":
        texts, text_note = held_out_texts(cfg)
    else:
        texts, text_note = [], f"held-out text perplexity applies to causal LMs only ({model.kind} model); DD is on pass rows"
    say(text_note)
    keep, keep_note = [], "no keep set (config.eval.keep)"
    if cfg.eval.keep:
        t = time.perf_counter()
        keep, keep_note = keep_set(model, cfg, exclude_prompts=[r["prompt"] for r in train_rows + val_rows])
        times["keep_set"] = time.perf_counter() - t
        say(f"keep set: {keep_note}")
    data = prepare_splits(model, {"train": train_rows, "val": val_rows})
    # CounterFact data: every edit is also scored with ROME's metrics on its own record
    cf_records = {r.id: r for r in records} if cfg.format == "counterfact" else None
    results: dict[str, Any] = {}
    training: dict[str, Any] = {}
    subjects = {r.id: r.subject for r in records}  # causal / rome: the edit set keeps no subjects
    causal_layer, trace_info = None, None
    if "rome" in cfg.methods and cfg.rome.covariance == "held_out" and not texts:  # before any method trains
        raise ValueError(
            f"method 'rome': config.rome.covariance='held_out' needs held-out text (config.eval.text, config.eval.n_texts), "
            f"but: {text_note}. Set --config.rome.covariance=identity to edit without ROME's key statistics"
        )
    if needs_trace(cfg):
        t = time.perf_counter()
        causal_layer, trace_info = causal_trace_layer(model, train_rows, subjects, cfg, work, needs_trace(cfg))
        times["causal_trace"] = time.perf_counter() - t
        say(f"causal tracing of {len(trace_info['facts'])} train fail rows chose {causal_layer} "
            f"({trace_info['forward_passes']} forward passes, {trace_info['skipped_rows']} rows without their subject "
            f"in the prompt left out) in {times['causal_trace']:.1f}s")
    for method in cfg.methods:
        t = time.perf_counter()
        eval_rows, skipped_edits = val_rows, None
        if method in ("salem", "salem3", "mend_fixed", "causal"):
            layers = {
                "salem": tuple(profile.chosen),
                "salem3": top3,
                "mend_fixed": tuple(model.layers.names()[-cfg.fixed_layers :]),
                "causal": (causal_layer,),
            }[method]
            say(f"{method}: training a MEND editor on {', '.join(layers)}")
            editor, tr = train_mend(model, data, layers, cfg, work / f"editor_{method}", mesh=mesh)
            training[method] = dict(
                layers=list(layers), steps=tr.step, evaluated_step=editor.step, best_step=tr.best_step,
                best_val_loss=tr.best_val_loss,
                stopped_early=tr.stopped_early, last_val=tr.last_val, recompiles=tr.recompiles,
                seconds=time.perf_counter() - t,
            )
            if method == "causal":
                training[method]["trace"] = trace_info
            edit = mend_edit_fn(model, editor)
        elif method in ("ft", "ft_kl"):
            layers = top1
            edit = ft_edit_fn(model, layers, cfg, kl=method == "ft_kl", pass_rows=[r for r in train_rows if r["group"] == "pass"])
            training[method] = dict(layers=list(layers), steps=cfg.ft.steps, seconds=0.0)
        elif method == "rome":
            layers = (cfg.rome.layer or causal_layer,)
            say(f"rome: rank-one edits of {layers[0]}'s MLP output projection")
            edit, training[method], eval_rows, skipped_edits = rome_method(
                model, layers[0], val_rows, texts, text_note, subjects, cfg)
            if not cfg.rome.layer:
                training[method]["trace"] = trace_info
            if skipped_edits:
                say(f"rome: {len(skipped_edits)} val fail rows without their subject in the prompt are skipped")
        else:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        t = time.perf_counter()
        results[method] = evaluate_method(model, edit, eval_rows, texts, cfg, method, keep=keep, cf_records=cf_records)
        results[method]["layers"] = list(layers)
        if skipped_edits is not None:
            results[method]["skipped_edits"] = len(skipped_edits)
            results[method]["skipped_edit_rows"] = list(skipped_edits)
        times[f"eval_{method}"] = time.perf_counter() - t
        say(f"{method}: EA {_fmt(results[method].get('ea'))}, adapt {_fmt(results[method].get('adapt_acc'))}, "
            f"DD {_fmt(results[method].get('dd_acc'))}")

    times["total"] = time.perf_counter() - t_all
    out = dict(
        config=json.loads(cfg.to_json_best_effort()),
        model=model.name,
        edit_set=es.info,
        profile=profile.to_dict(),
        chosen_layers=list(profile.chosen),
        methods=results,
        training=training,
        text=text_note,
        keep=keep_note,
        times=times,
    )
    table = results_table(out)
    if _main_process():  # results from process 0; orbax checkpoints are written by every host
        (work / "results.json").write_text(json.dumps(_jsonable(out), indent=2))
        (work / "results.md").write_text(table + "\n")
        _plot_training(work, list(training), work / "training.png")
    print(table, flush=True)
    say(f"done in {times['total']:.0f}s; results in {work}")
    return out


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
)
OPTIONAL_COLUMNS = ("dd_keep_acc", "cf/ES", "cf/PS", "cf/NS", "cf/Score")  # shown only when measured


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def results_table(out: dict) -> str:
    """The before/after table as markdown: one row for the base model, one per method."""
    methods = out["methods"]
    # keep-set and CounterFact columns only when measured (config.eval.keep, CounterFact data)
    columns = [(k, c) for k, c in COLUMNS
               if k not in OPTIONAL_COLUMNS or any(m.get(k) is not None for m in methods.values())]
    lines = [
        f"model {out['model']}, edit layers {', '.join(out['chosen_layers'])} "
        f"(scorer {out['profile']['scorer']}), val edits per method: "
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
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if dataclasses.is_dataclass(x):
        return _jsonable(dataclasses.asdict(x))
    return x


def _plot_profile(profile, path: Path) -> None:
    from salem_jax.locate.plot import plot_profile

    plot_profile(profile, str(path))


def _plot_training(work: Path, methods: list[str], path: Path) -> None:
    """Validation EA, DD and loss against editor steps, from each editor's metrics.jsonl."""
    import matplotlib

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

