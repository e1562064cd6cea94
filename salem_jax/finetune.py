"""Fine-tuning a sequence classifier (BERT family) on classification records: `salem finetune`.

This is how a classifier gets the task skill the paper's classification experiments assume
(FEVER, NLI): all-MiniLM-L6-v2 (`load_model("minilm-l6")`) arrives with a new random head. It is
not the FT editing baseline (`salem_jax.baselines.finetune`, which fine-tunes a few weights on
one edit).

* Records: `EditRecord`s with a declared label set (`read_fever`, `read_nli`,
  `read_classification`; a label outside the set is the reader's error, naming file, record, field).
* Splits (`split_records_for_finetune`): records are grouped by their text (prompt, text pair),
  so duplicate claims never land on two sides, and a seeded permutation of the groups gives
  `finetune` (trained on), `heldout` (accuracy after each epoch, early stopping) and `edit`
  (left for the editing experiments, which split them again into editor train / val edits).
  `splits.json` says which record went where; `check_disjoint` refuses an edit set that shares
  a record with the fine-tuning or held-out split, naming the records.
* Optimiser: optax AdamW (weight decay not applied to biases and LayerNorm), gradient clipping
  at global norm 1, a schedule of linear warm-up then linear decay to 0 over all steps.
* One jitted step on a fixed-shape batch (texts truncated / padded to one length; the last batch
  of an epoch padded with zero-weight rows), so the step compiles once.
* Determinism by (seed, step): the batch of step s is a slice of the permutation
  `default_rng([seed, epoch])` of the fine-tuning records, so a resumed run sees exactly the
  batches an uninterrupted one sees. No dropout: `LoadedModel.apply` is deterministic (the
  classifiers here are fine-tuned without it; say so when comparing with a recipe that uses it).
* Checkpoints: orbax (`<out>.ckpt/<step>/`: params, opt_state, and a JSON record of the run:
  step, per-epoch held-out accuracy, best epoch), every `checkpoint_every` steps and at each
  epoch end, written atomically. Rerunning the same command resumes from the latest one; a
  checkpoint of another configuration is refused (CheckpointMismatch), never mixed in.
* Early stopping: after each epoch the held-out accuracy is measured; when it improves, the
  model folder `out` is rewritten (atomically) with those parameters; after `patience` epochs
  without improvement training stops. `out` therefore always holds the best model so far.
* The saved folder: `save_model`'s layout (config.json with id2label / label2id, Flax weights,
  tokenizer) plus PyTorch-named `model.safetensors` when torch is installed, so both
  `load_model(out)` and transformers' `AutoModelForSequenceClassification.from_pretrained(out)`
  open it; `finetune.json` beside them records the run (accuracies, majority-class rate, splits).
  Its per-epoch `train_loss` is the mean over the steps the last process ran in that epoch (after
  a resume, only the steps since the checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from salem_jax.data.records import EditRecord
from salem_jax.models import load_model
from salem_jax.models.base import LoadedModel
from salem_jax.models.loading import save_model

log = logging.getLogger(__name__)

FORMAT = "salem-jax-finetune/1"
SPLITS = ("finetune", "heldout", "edit")


class FinetuneError(ValueError):
    """Bad input to fine-tuning (a model without a head, labels that do not match, ...)."""


class CheckpointMismatch(FinetuneError):
    """A checkpoint folder belongs to another fine-tuning configuration."""


class OverlapError(ValueError):
    """An edit set shares records with the fine-tuning (or held-out) split."""


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5  # peak AdamW learning rate
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # of all steps: linear warm-up, then linear decay to 0
    grad_clip: float = 1.0
    max_length: int = 128  # tokens; longer texts are truncated (the count is reported)
    patience: int = 1  # epochs without a better held-out accuracy before stopping
    checkpoint_every: int = 200  # steps (and at every epoch end)
    eval_batch_size: int = 64
    seed: int = 0
    max_steps: int = 0  # > 0: stop after this many steps in all (a time budget); 0 = epochs only


# Fields that change the trajectory: a resumed run must agree on them (epochs/patience/max_steps
# change the schedule's length, so they count too).
_TRAJECTORY = ("epochs", "batch_size", "lr", "weight_decay", "warmup_fraction", "grad_clip", "max_length", "seed",
               "max_steps")


# ----------------------------------------------------------------------------- splits


def text_key(rec: EditRecord) -> str:
    """Records with the same text (and pair) share this key and always share a split."""
    return hashlib.sha1(json.dumps([rec.prompt.strip().lower(), rec.text_pair.strip().lower()]).encode()).hexdigest()


def split_records_for_finetune(
    records: Sequence[EditRecord], *, heldout: float = 0.1, edit: float = 0.2, seed: int = 0
) -> dict[str, list[str]]:
    """Record ids per split ("finetune", "heldout", "edit"), grouped by text (see `text_key`).

    `heldout` and `edit` are fractions of the text groups (rounded, at least one group each when
    the fraction is > 0); the rest is fine-tuned on. Deterministic for a seed and the records.
    """
    if not (0 <= heldout < 1 and 0 <= edit < 1 and heldout + edit < 1):
        raise ValueError(f"heldout ({heldout}) and edit ({edit}) must be fractions that sum to less than 1")
    groups: dict[str, list[str]] = {}
    seen: set[str] = set()
    for r in records:
        if r.id in seen:
            raise ValueError(f"duplicate record id {r.id!r}")
        seen.add(r.id)
        groups.setdefault(text_key(r), []).append(r.id)
    keys = sorted(groups)  # independent of the record order
    order = np.random.default_rng([seed, 7]).permutation(len(keys))

    def count(frac):
        return 0 if frac == 0 else max(1, int(math.floor(len(keys) * frac + 0.5)))

    n_held, n_edit = count(heldout), count(edit)
    if n_held + n_edit >= len(keys):
        raise ValueError(f"{len(records)} records ({len(keys)} distinct texts) are too few for a fine-tuning split")
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for pos, k in enumerate(order):
        split = "heldout" if pos < n_held else "edit" if pos < n_held + n_edit else "finetune"
        out[split].extend(groups[keys[k]])
    for s in SPLITS:
        out[s].sort(key=id_order)
    return out


def id_order(rid: str):
    name, _, num = rid.rpartition(":")
    return (name, int(num)) if num.isdigit() else (rid, -1)


def splits_document(splits: dict[str, list[str]], records: Sequence[EditRecord], **info) -> dict:
    """The content of `splits.json`: ids per split, the text key of every record (so that overlap
    checks also catch the same text under another id) and `info` (source files, seed, fractions)."""
    by_id = {r.id: r for r in records}
    missing = [i for v in splits.values() for i in v if i not in by_id]
    if missing:
        raise ValueError(f"splits name records that are not given: {missing[:5]}")
    return dict(format="salem-jax-splits/1", **info,
                counts={s: len(v) for s, v in splits.items()},
                splits=splits,
                text_keys={s: sorted({text_key(by_id[i]) for i in v}) for s, v in splits.items()})


def read_splits(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "splits.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no splits.json (written by `salem finetune` into the model folder)")
    doc = json.loads(p.read_text())
    if doc.get("format") != "salem-jax-splits/1":
        raise ValueError(f"{p}: not a splits file (format {doc.get('format')!r})")
    return doc


def check_disjoint(edit_records: Sequence[EditRecord], splits: dict, where: str = "") -> None:
    """Refuse edit records that were fine-tuned on or used for model selection (by id or by text).

    `splits` is `read_splits(...)`'s dict. Raises OverlapError naming up to 10 records and the split.
    """
    for split in ("finetune", "heldout"):
        ids = set(splits["splits"].get(split, ()))
        keys = set(splits.get("text_keys", {}).get(split, ()))
        bad = [r.id for r in edit_records if r.id in ids or text_key(r) in keys]
        if bad:
            raise OverlapError(
                f"{len(bad)} edit record(s) are in the {split!r} split of the fine-tuned model{' (' + where + ')' if where else ''}: "
                f"{', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}. Edit only records of the 'edit' split "
                "(splits.json in the model folder lists them)"
            )


# ----------------------------------------------------------------------------- data


def check_classifier(model: LoadedModel, labels: Sequence[str]) -> None:
    """A clear error, before any costly step, when `model` cannot be fine-tuned on `labels`."""
    if model.kind != "classifier":
        raise FinetuneError(
            f"model {model.name!r} is a {model.kind} model ({model.arch}) without a classification head; fine-tuning "
            "needs a sequence classifier: pass a BERT-family folder (config.json model_type 'bert'; a folder without "
            "a head gets a new one: `salem finetune --model FOLDER --num-labels N` or load_model(FOLDER, "
            "num_labels=N)) or the named model 'minilm-l6'"
        )
    n = int(getattr(model.config, "num_labels", 0) or 0)
    if n != len(labels):
        raise FinetuneError(
            f"model {model.name!r} has {n} output classes but the label set {list(labels)} has {len(labels)}; "
            f"load it with num_labels={len(labels)} (a new head is then initialised)"
        )


def label_set(records: Sequence[EditRecord], where: str = "records") -> tuple[str, ...]:
    sets = {r.labels for r in records}
    if not records:
        raise FinetuneError(f"{where}: no records")
    if len(sets) != 1 or not next(iter(sets)):
        raise FinetuneError(
            f"{where}: records need one declared label set (read them with read_fever / read_nli / "
            f"read_classification); found {sorted(map(list, sets))}"
        )
    return next(iter(sets))


def encode_records(model: LoadedModel, records: Sequence[EditRecord], max_length: int) -> tuple[dict, int]:
    """Tokenize all records to one fixed length (the longest, capped at `max_length`; texts longer
    than that are truncated, pairs from the longer side first). Returns (int32 numpy arrays
    input_ids / attention_mask / token_type_ids / labels [N, ...], number of truncated records)."""
    tok = model.tokenizer
    if tok is None:
        raise FinetuneError(f"model {model.name!r} has no tokenizer")
    cap = min(int(max_length), int(model.max_length))
    labels = label_set(records)
    texts = [r.prompt for r in records]
    pairs = [r.text_pair for r in records] if any(r.text_pair for r in records) else None
    full = tok(texts, pairs, add_special_tokens=True) if pairs else tok(texts, add_special_tokens=True)
    lengths = [len(x) for x in full["input_ids"]]
    length = min(cap, max(lengths))
    kw = dict(add_special_tokens=True, truncation=True, max_length=length, padding="max_length")
    enc = tok(texts, pairs, **kw) if pairs else tok(texts, **kw)
    ids = np.asarray(enc["input_ids"], np.int32)
    types = np.asarray(enc.get("token_type_ids", np.zeros_like(ids)), np.int32)
    mask = np.asarray(enc["attention_mask"], np.int32)
    y = np.asarray([labels.index(r.target_true) for r in records], np.int32)
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=y), sum(n > length for n in lengths)


def _rows(data: dict, idx: np.ndarray, size: int) -> tuple[dict, np.ndarray]:
    """Rows `idx` padded to `size` (zero-weight copies of row 0) -> (batch for model.apply, weights)."""
    n = len(idx)
    full = np.concatenate([idx, np.zeros(size - n, idx.dtype)]) if n < size else idx
    b = {k: v[full] for k, v in data.items()}
    batch = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
                 labels=b["labels"][:, None], label_mask=np.ones((size, 1), np.int32))
    w = (np.arange(size) < n).astype(np.float32)
    return batch, w


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Record positions of step `step` (0-based): a function of (seed, step) only."""
    per_epoch = math.ceil(n / batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size : (k + 1) * batch_size]


# ----------------------------------------------------------------------------- optimiser, step


def _decay_mask(params):
    """AdamW weight decay on kernels and embeddings, not on biases or LayerNorm (BERT's recipe)."""
    def leaf(path, x):
        name = jax.tree_util.keystr(path).lower()
        return not (name.endswith("['bias']") or "layernorm" in name or name.endswith("['scale']"))

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_optimizer(config: FinetuneConfig, total_steps: int, params=None) -> optax.GradientTransformation:
    """Clip + AdamW with linear warm-up and decay. The same object for the same (config,
    total_steps) (`params` is not needed: the decay mask is computed from the parameters the
    optimizer sees), so a resumed or repeated run reuses the compiled step (`make_step`)."""
    return _optimizer(config, int(total_steps))


@functools.lru_cache(maxsize=16)
def _optimizer(config: FinetuneConfig, total_steps: int) -> optax.GradientTransformation:
    warm = int(round(config.warmup_fraction * total_steps))
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, config.lr, max(warm, 1)),
         optax.linear_schedule(config.lr, 0.0, max(total_steps - warm, 1))],
        [max(warm, 1)],
    ) if warm > 0 else optax.linear_schedule(config.lr, 0.0, max(total_steps, 1))
    return optax.chain(
        optax.clip_by_global_norm(config.grad_clip),
        optax.adamw(schedule, weight_decay=config.weight_decay, mask=_decay_mask),
    )


def classification_loss(apply: Callable, params, batch: dict, weights: jax.Array) -> jax.Array:
    """Weighted mean cross-entropy of the class logits (`apply` gives [B, 1, C])."""
    logits = apply(params, batch)[:, 0, :].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["labels"], axis=-1)[:, 0]
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


@functools.lru_cache(maxsize=16)
def make_step(apply: Callable, tx: optax.GradientTransformation):
    """The jitted training step of `apply` and `tx`; cached, so one model and optimizer compile
    it once however many runs use them."""

    @jax.jit
    def step(params, opt_state, batch, weights):
        loss, grads = jax.value_and_grad(lambda p: classification_loss(apply, p, batch, weights))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@functools.partial(jax.jit, static_argnums=0)
def _argmax_class(apply: Callable, params, batch: dict) -> jax.Array:
    return jnp.argmax(apply(params, batch)[:, 0, :], -1)


def predict(model: LoadedModel, params, data: dict, batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """Argmax class of every row of `data` (encode_records' arrays)."""
    fn = functools.partial(_argmax_class, model.apply)
    n = len(data["labels"])
    out = []
    for s in tqdm(range(0, n, batch_size), desc="held-out", disable=not progress, leave=False):
        idx = np.arange(s, min(s + batch_size, n))
        b, _ = _rows(data, idx, batch_size)
        out.append(np.asarray(fn(params, b))[: len(idx)])
    return np.concatenate(out) if out else np.zeros(0, np.int32)


def accuracy(model: LoadedModel, params, data: dict, batch_size: int = 64) -> float:
    return float(np.mean(predict(model, params, data, batch_size) == data["labels"]))


# ----------------------------------------------------------------------------- checkpoints


def write_json(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
    return path


def _manager(directory: Path) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory.absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True, cleanup_tmp_directories=True),
    )


def _abstract(tree):
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class FinetuneResult:
    out: str  # the saved model folder (best held-out accuracy)
    params: Any  # the best parameters
    history: list[dict]  # per epoch: epoch, step, train_loss, heldout_acc
    best_epoch: int
    best_acc: float
    majority_rate: float  # held-out share of the most frequent fine-tuning label
    steps: int
    stopped_early: bool
    resumed_from: int | None
    seconds: float
    truncated: int


def _with_label_names(model: LoadedModel, labels: Sequence[str]) -> LoadedModel:
    cfg = copy.deepcopy(model.config)
    cfg.id2label = {i: str(n) for i, n in enumerate(labels)}
    cfg.label2id = {str(n): i for i, n in enumerate(labels)}
    return dataclasses.replace(model, config=cfg)


def save_classifier(model: LoadedModel, params, out: str | os.PathLike, *, torch_weights: bool | None = None) -> str:
    """`save_model` plus PyTorch weights (`torch_weights=None`: when torch is installed, which is
    what transformers' AutoModelForSequenceClassification needs to open the folder anyway)."""
    if torch_weights is None:
        torch_weights = importlib.util.find_spec("torch") is not None
        if not torch_weights:
            log.warning("torch is not installed: %s gets Flax weights only (load_model opens it;"
                        " PyTorch's AutoModelForSequenceClassification needs model.safetensors)", out)
    return save_model(model, params, out, torch_weights=torch_weights)


def finetune_classifier(
    model: LoadedModel,
    train: Sequence[EditRecord],
    heldout: Sequence[EditRecord],
    out: str | os.PathLike,
    config: FinetuneConfig = FinetuneConfig(),
    *,
    checkpoint_dir: str | os.PathLike | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    extra_info: dict | None = None,
    splits_doc: dict | None = None,
    torch_weights: bool | None = None,
) -> FinetuneResult:
    """Fine-tune every parameter of `model` on `train`, select the epoch by accuracy on `heldout`,
    save the best model to `out` (see the module docstring). `checkpoint_dir` defaults to
    `<out>.ckpt`; an existing one of the same configuration is resumed. `on_step(step)` is called
    after each optimiser step (tests use it to interrupt a run). `model.params` are not modified.
    `splits_doc` (`splits_document(...)`) is written as `out/splits.json` with every saved model,
    `extra_info` into `out/finetune.json`.
    """
    # --- checks: label sets, the model's classes, the batch settings
    t0 = time.perf_counter()
    labels = label_set(train, "fine-tuning records")
    if label_set(heldout, "held-out records") != labels:
        raise FinetuneError("fine-tuning and held-out records have different label sets")
    check_classifier(model, labels)
    if config.batch_size < 1 or config.epochs < 1:
        raise FinetuneError(f"batch_size and epochs must be >= 1, got {config.batch_size}, {config.epochs}")
    model = _with_label_names(model, labels)
    out = Path(out).expanduser().absolute()
    ck = Path(checkpoint_dir).expanduser().absolute() if checkpoint_dir else out.with_name(out.name + ".ckpt")

    # --- encode both splits; schedule; the majority-class baseline
    data, trunc = encode_records(model, train, config.max_length)
    held, trunc_h = encode_records(model, heldout, config.max_length)
    if trunc or trunc_h:
        log.warning("%d fine-tuning and %d held-out texts are longer than %d tokens and were truncated", trunc, trunc_h,
                    data["input_ids"].shape[1])
    n = len(train)
    per_epoch = math.ceil(n / config.batch_size)
    total = per_epoch * config.epochs
    if config.max_steps:
        total = min(total, config.max_steps)
    counts = np.bincount(data["labels"], minlength=len(labels))
    majority = int(np.argmax(counts))
    majority_rate = float(np.mean(held["labels"] == majority))

    # --- optimizer, jitted step, the run's stamp
    tx = make_optimizer(config, total, model.params)
    step_fn = make_step(model.apply, tx)
    params = jax.tree.map(jnp.asarray, model.params)
    opt_state = tx.init(params)
    stamp = dict(format=FORMAT, model=model.name, labels=list(labels), n_train=n, n_heldout=len(heldout),
                 train_hash=hashlib.sha1("\n".join(r.id for r in train).encode()).hexdigest(),
                 config={k: getattr(config, k) for k in _TRAJECTORY})
    run = dict(stamp, step=0, history=[], best_epoch=-1, best_acc=-1.0, stopped_early=False)

    # --- resume a checkpoint of the same configuration; saving
    mngr = _manager(ck)
    resumed = mngr.latest_step()
    if resumed is not None:
        restored = mngr.restore(resumed, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(_abstract(params)),
            opt_state=ocp.args.StandardRestore(_abstract(opt_state)),
            run=ocp.args.JsonRestore()))
        old = dict(restored["run"])
        mismatch = {k: (old.get(k), v) for k, v in stamp.items() if old.get(k) != v}
        if mismatch:
            raise CheckpointMismatch(
                f"{ck} holds a fine-tuning run of another configuration ({', '.join(f'{k}: {a!r} != {b!r}' for k, (a, b) in mismatch.items())}); "
                "pass another --out / checkpoint folder, or delete that folder to start over"
            )
        params, opt_state, run = restored["params"], restored["opt_state"], old
        log.info("resuming fine-tuning from step %d (%s)", resumed, ck)

    def sidecars():
        info = dict(run, majority_rate=majority_rate, majority_label=labels[majority], truncated=trunc + trunc_h,
                    max_length=int(data["input_ids"].shape[1]), steps_per_epoch=per_epoch, total_steps=total,
                    **(extra_info or {}))
        write_json(out / "finetune.json", jsonable(info))
        if splits_doc is not None:
            write_json(out / "splits.json", splits_doc)

    def save(step):
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                opt_state=ocp.args.StandardSave(opt_state),
                                                run=ocp.args.JsonSave(run)), force=True)
        mngr.wait_until_finished()

    best_params = None
    if run["best_epoch"] >= 0 and (out / "config.json").is_file():
        best_params = load_model(str(out)).params
    # --- the loop: steps, per-epoch held-out accuracy, best model saved, early stop
    step = int(run["step"])
    losses: list[float] = []
    bar = tqdm(total=total, initial=step, desc="fine-tune", disable=not progress, unit="step")
    try:
        while step < total and not run["stopped_early"]:
            idx = batch_indices(n, config.batch_size, config.seed, step)
            batch, w = _rows(data, idx, config.batch_size)
            params, opt_state, loss = step_fn(params, opt_state, batch, w)
            step += 1
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
            run["step"] = step
            epoch_end = step % per_epoch == 0 or step == total
            if epoch_end:
                acc = accuracy(model, params, held, config.eval_batch_size)
                epoch = math.ceil(step / per_epoch) - 1
                run["history"].append(dict(epoch=epoch, step=step, heldout_acc=acc,
                                           train_loss=float(np.mean(losses)) if losses else None))
                losses = []
                bar.write(f"epoch {epoch}: held-out accuracy {acc:.4f} (majority class {majority_rate:.4f})")
                if acc > run["best_acc"]:
                    run["best_acc"], run["best_epoch"] = acc, epoch
                    best_params = params
                    save_classifier(model, params, out, torch_weights=torch_weights)
                    sidecars()
                elif epoch - run["best_epoch"] >= config.patience:
                    run["stopped_early"] = True
            if epoch_end or step % config.checkpoint_every == 0:
                save(step)
            if on_step is not None:
                on_step(step)
    finally:
        bar.close()
        mngr.wait_until_finished()
    # --- result
    if (out / "config.json").is_file():
        sidecars()  # the final history (epochs after the best one included)
    return FinetuneResult(out=str(out), params=best_params, history=run["history"], best_epoch=run["best_epoch"],
                          best_acc=run["best_acc"], majority_rate=majority_rate, steps=step,
                          stopped_early=run["stopped_early"], resumed_from=resumed,
                          seconds=time.perf_counter() - t0, truncated=trunc + trunc_h)


def jsonable(x):
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


def checkpoint_params(model: LoadedModel, checkpoint_dir: str | os.PathLike, step: int | None = None):
    """(parameters, step) of a fine-tuning checkpoint (the latest by default), e.g. to measure a run
    that was stopped before its epoch ended. `model` supplies the parameter structure."""
    mngr = ocp.CheckpointManager(Path(checkpoint_dir).expanduser().absolute())
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{checkpoint_dir}: no fine-tuning checkpoint")
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(model.params))))
    return restored["params"], step
