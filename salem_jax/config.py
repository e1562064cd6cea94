"""Every default of the pipeline in one place: frozen dataclasses, and the ConfigDict derived from them.

The sections of the pipeline config (`default_config()`, what `experiments/` edit and
`--config.a.b=v` overrides) are made from these values, never written twice:

- `editor`: a `mend.train.TrainConfig` (with its `mend.editor.EditorConfig`), flattened under the
  names of `EDITOR_KEYS` (`steps` is `max_steps`, `rank` is `editor.rank`, ...). Its defaults are
  the preset `CPU_EDITOR`: the CPU budget the SmolLM2 experiments use (an optimiser update after
  every edit group at Adam lr 1e-4, 150 steps). Its `seed` (-1: the top-level seed) reseeds the
  editor alone (initialisation and data order), nothing else of the run. `TrainConfig()` itself holds the paper's schedule
  (lr 1e-6, 150k steps, batch 10 by accumulation), which `experiments.common.paper_editor` applies.
  `salem train-editor` takes the same keys as flags (`--steps`, `--rank`, `--c-loc`, ...).
- `ft`: a `baselines.finetune.FTConfig` (preset `PIPELINE_FT`: 10 steps, KL weight 1 for `ft_kl`).
- `rome`: `layer` and `covariance`, then every `baselines.rome.ROMEConfig` field (ROME's defaults).
- `editability`: a `locate.editability.EditabilityConfig` (method `salem_edit`'s layer score; its
  `part` and `seed` are taken from `saliency.part` and the top-level `seed`).
- `ke`, `enn`: a `baselines.ke.KEConfig` / `baselines.enn.ENNConfig` (presets `PIPELINE_KE`,
  `PIPELINE_ENN`: 100 training steps; their `seed` is replaced by the top-level seed).
- `locate_edit`: methods rrome / memit / emmet / alphaedit (`LocateEdit`: the layer, band, key
  statistics and the `baselines.locate_edit.EditorConfig` fields, defaults read from it).
- `saliency`, `trace`, `eval` and the top level: the dataclasses below.

Every field of every one of these dataclasses is a key of the ConfigDict, so `--config.*`
reaches all of them. `train_config` (from the flat `editor` section, e.g. `cfg.editor.to_dict()`),
`ft_config` and `rome_config` (from the whole ConfigDict) give back the dataclasses the library takes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections
import numpy as np

from salem_jax.baselines.enn import ENNConfig
from salem_jax.baselines.finetune import FTConfig
from salem_jax.baselines.ke import KEConfig
from salem_jax.baselines.locate_edit import EditorConfig as LocateEditorConfig
from salem_jax.baselines.rome import ROMEConfig
from salem_jax.locate.editability import EditabilityConfig
from salem_jax.mend.editor import EditorConfig
from salem_jax.mend.train import TrainConfig

# ----------------------------------------------------------------------------- the editor (MEND)

# pipeline / train-editor key -> TrainConfig field ("editor.x" = EditorConfig field x)
EDITOR_KEYS = {
    "steps": "max_steps", "lr": "lr", "lr_lr": "lr_lr", "rank": "editor.rank", "n_hidden": "editor.n_hidden",
    "mode": "editor.mode", "normalize": "editor.normalize", "edit_lr_init": "editor.edit_lr_init",
    "norm_eps": "editor.norm_eps", "c_fail": "c_fail", "c_loc": "c_loc", "grad_clip": "grad_clip",
    "effective_batch": "effective_batch", "batch_size": "batch_size", "accum_steps": "accum_steps",
    "edits_per_group": "edits_per_group", "adapt_per_edit": "adapt_per_edit", "pass_per_group": "pass_per_group",
    "extra_pass_per_group": "extra_pass_per_group", "own_pass_per_group": "own_pass_per_group",
    "val_every": "val_every", "val_groups": "val_groups", "patience": "patience",
    "checkpoint_every": "checkpoint_every", "keep_checkpoints": "keep_checkpoints", "log_every": "log_every",
    "null_energy": "null_energy", "null_tokens": "null_tokens",
    "null_facts": "null_facts", "null_facts_weight": "null_facts_weight",
}
# keys only the pipeline can act on (`salem train-editor` has no flag for them): the fact rows of
# null_facts come from the pipeline's keep set and splits (`pipeline.null_fact_rows`)
PIPELINE_ONLY_KEYS = ("null_facts", "null_facts_weight")
# TrainConfig fields whose None ("derive it") is written 0 in a ConfigDict, which needs one type per key
ZERO_IS_NONE = ("batch_size", "accum_steps")
EDITOR_HELP = {
    "steps": "maximum number of steps",
    "batch_size": "edit groups per step (0 / unset: one per device)",
    "effective_batch": "groups per optimiser update (accumulated)",
    "accum_steps": "steps accumulated per update (overrides effective_batch; 0 / unset: derived)",
    "lr": "Adam learning rate of the editor network",
    "lr_lr": "Adam learning rate of the per-weight edit learning rates",
    "c_fail": "weight of the edit NLL (paper: 0.1)",
    "c_loc": "weight of the locality KL",
    "adapt_per_edit": "rephrasings of each edit in its loss",
    "extra_pass_per_group": ("pass rows per group from the second pass pool (pipeline: config.train_pass's "
                             "rows) on top of pass_per_group rows of the first (0: one pooled set)"),
    "own_pass_per_group": ("of the pass_per_group rows, this many from the edit's own record (pass rows with its "
                           "record_id, e.g. CounterFact's neighbourhood prompts), the rest from the pool (0: all "
                           "from the pool)"),
    "patience": "early stop after this many steps without a better val loss",
    "normalize": "standardise u and delta with running statistics",
    "null_energy": ("> 0: every edit, in training and after, goes through AlphaEdit's null-space projection of each "
                    "edited kernel's input covariance over WikiText (its eigen-directions holding at most this share "
                    "of the trace; mend.nullspace), so the editor learns to edit there; 0 = off"),
    "null_tokens": "WikiText tokens of the key statistics behind null_energy's projection",
    "null_facts": ("fact keys added to null_energy's covariance, C = C_text + null_facts_weight x C_facts (per-token "
                   "means): 'countries:REL,REL' (facts of the train countries outside the keep set and the val split) "
                   "and/or 'edit_pass' (the edit set's train pass rows of those countries), joined by '+'; '' = none"),
    "null_facts_weight": "the fact keys' per-token weight relative to WikiText's in null_facts' covariance (> 0)",
}

# The CPU budget of the SmolLM2 experiments, not the paper's schedule (TrainConfig()): an optimiser
# update after every edit group (effective_batch 1) at Adam lr 1e-4. On SmolLM2 capitals this reached
# val fail accuracy 0.42 after 50 steps, where MEND's batch of 10 groups per update reached 0.26 after
# 100 and 0.32 after 300 steps (30 updates); lr 1e-3, or lr_lr 1e-3, or edit_lr_init 1e-2 made the
# first updates blow up the KL term (edits then break the pass rows).
CPU_EDITOR = TrainConfig(
    editor=EditorConfig(rank=1920, n_hidden=1, edit_lr_init=1e-4), lr=1e-4, lr_lr=1e-4, c_fail=0.1,
    effective_batch=1, adapt_per_edit=2, max_steps=150, val_every=50, val_groups=32, patience=1000,
    checkpoint_every=50,
)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def editor_values(tc: TrainConfig) -> dict[str, Any]:
    """The flat `editor` section (EDITOR_KEYS) of a TrainConfig; None is written 0 (ZERO_IS_NONE)."""
    out = {k: _get(tc, f) for k, f in EDITOR_KEYS.items()}
    return {k: (0 if k in ZERO_IS_NONE and v is None else v) for k, v in out.items()}


# The pipeline's `editor` section also holds `seed` (not a key of EDITOR_KEYS: `salem train-editor` has its
# own --seed): the editor's seed (its initialisation and its data order) when >= 0; EDITOR_SEED_TOP (-1, the
# default) = the top-level seed, as before the key existed. The edit set, keep set, editability probes and
# every other seeded step keep the top-level seed, so `--config.editor.seed=N` retrains only the editor.
EDITOR_SEED_KEY = "seed"
EDITOR_SEED_TOP = -1


def check_editor_seed(value, name: str = "config.editor.seed") -> int:
    """A per-part seed `value` (config.editor.seed, config.eval.keep_seed) as an int (>= 0, or
    EDITOR_SEED_TOP); anything else is a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r}: give an integer seed >= 0, or {EDITOR_SEED_TOP} for the top-level seed")
    if value < EDITOR_SEED_TOP:
        raise ValueError(f"{name}={value}: give a seed >= 0, or {EDITOR_SEED_TOP} for the top-level seed")
    return int(value)


def train_config(values: Mapping[str, Any], seed: int, base: TrainConfig = TrainConfig()) -> TrainConfig:
    """A TrainConfig from a flat `editor` section (any subset of EDITOR_KEYS, plus `seed`; the rest from `base`).

    seed: the TrainConfig's seed (the pipeline's top-level seed), unless values["seed"] (config.editor.seed)
    is >= 0: that one then (EDITOR_SEED_TOP, -1: `seed`)."""
    values = dict(values)
    editor_seed = check_editor_seed(values.pop(EDITOR_SEED_KEY, EDITOR_SEED_TOP))
    unknown = set(values) - set(EDITOR_KEYS)
    if unknown:
        raise KeyError(f"editor: unknown keys {sorted(unknown)}; keys are {sorted(EDITOR_KEYS)} and {EDITOR_SEED_KEY!r}")
    top, editor = {"seed": seed if editor_seed == EDITOR_SEED_TOP else editor_seed}, {}
    for k, v in values.items():
        v = None if k in ZERO_IS_NONE and v == 0 else v
        f = EDITOR_KEYS[k]
        if f.startswith("editor."):
            editor[f[len("editor.") :]] = v
        else:
            top[f] = v
    return dataclasses.replace(base, editor=dataclasses.replace(base.editor, **editor), **top)


# ----------------------------------------------------------------------------- the other sections

PIPELINE_FT = FTConfig(steps=10, lr=1e-3, kl_weight=1.0)  # kl_weight applies to ft_kl only


def ft_config(cfg, kl: bool) -> FTConfig:
    """The FTConfig of method ft (kl=False: no KL term) or ft_kl from `cfg.ft`."""
    fc = FTConfig(**{f.name: cfg.ft[f.name] for f in dataclasses.fields(FTConfig)})
    return fc if kl else dataclasses.replace(fc, kl_weight=0.0)


# KE: the original paper's hyper-network sizes; lr a CPU budget's (MEND's port: 1e-5 over 100k+ steps).
PIPELINE_KE = KEConfig(steps=100, lr=1e-4)
# ENN: MEND's port's settings, 100 steps.
PIPELINE_ENN = ENNConfig(steps=100)


def ke_config(cfg) -> KEConfig:
    """The KEConfig of method ke from `cfg.ke` (seed = cfg.seed)."""
    values = {f.name: cfg.ke[f.name] for f in dataclasses.fields(KEConfig)}
    return KEConfig(**{**values, "seed": cfg.seed})


def enn_config(cfg) -> ENNConfig:
    """The ENNConfig of method enn from `cfg.enn` (seed = cfg.seed)."""
    values = {f.name: cfg.enn[f.name] for f in dataclasses.fields(ENNConfig)}
    return ENNConfig(**{**values, "seed": cfg.seed})


def rome_config(cfg) -> ROMEConfig:
    """ROMEConfig from the pipeline config's `rome` section."""
    return ROMEConfig(**{f.name: _tuple_if_list(cfg.rome[f.name]) for f in dataclasses.fields(ROMEConfig)})


def editability_config(cfg) -> EditabilityConfig:
    """EditabilityConfig from the pipeline config's `editability` section (part = saliency.part, seed = seed)."""
    e = cfg.editability
    vals = {f.name: _tuple_if_list(e[f.name]) for f in dataclasses.fields(EditabilityConfig)}
    return EditabilityConfig(**{**vals, "part": cfg.saliency.part, "seed": cfg.seed})


def _tuple_if_list(v):
    return tuple(v) if isinstance(v, list) else v


@dataclasses.dataclass(frozen=True)
class Saliency:
    """Which layers the edit goes to (paper eq. 2-5). groups: which edit-set groups are profiled (fail is
    needed for the choice; pass adds the contrast scorer's reference; adapt is reported only); at most
    max_examples rows each. part: the weights of each layer that are scored and edited (mlp | attention | all)."""

    scorer: str = "salem"
    top_k: int = 1
    part: str = "mlp"
    micro_batch: int = 8
    max_examples: int = 64
    select_group: str = "fail"
    groups: tuple[str, ...] = ("fail", "adapt", "pass")


@dataclasses.dataclass(frozen=True)
class Trace:
    """Causal tracing (methods causal / rome): up to `facts` train fail rows with the subject in the prompt."""

    facts: int = 8
    n_noise: int = 10
    restorations_per_call: int = 8


@dataclasses.dataclass(frozen=True)
class Rome:
    """Method rome: layer '' = the causal-traced one; covariance held_out = key statistics of the held-out
    texts (eval.text), identity = none; `edit` = ROMEConfig (ROME's GPT-2 XL values), flattened into the
    section."""

    layer: str = ""
    covariance: str = "held_out"
    edit: ROMEConfig = ROMEConfig()


_EDIT = LocateEditorConfig()  # the locate-then-edit editors' defaults, read once


@dataclasses.dataclass(frozen=True)
class LocateEdit:
    """Methods rrome / memit / emmet / alphaedit (salem_jax.methods.locate_edit): layer '' = the top layer
    of layer_from ("saliency": the profile's scorer, or "trace"); the band editors edit `band` blocks
    ending there; key statistics from cov_tokens tokens of `texts` (wikitext | held_out), cached on
    disk; n_prefixes prefixes (half of 5, half of 10 tokens) for the keys; alpha_preserve > 0: AlphaEdit's
    memory starts with the keys of that many train fail rows (methods.locate_edit.preserved_state), and with
    those of alpha_preserve_facts' country facts outside the keep set (at most alpha_preserve_facts_max),
    that seeded term weighted by alpha_preserve_weight; alpha_project_facts_weight > 0: those facts' keys also
    enter the covariance of AlphaEdit's null-space projector (C_text + w_p C_facts, a hard constraint;
    methods.locate_edit.facts_projections); retries > 0: edit again while an edit call's own
    prompts miss their targets (mend.retry.edit_until_reached); the rest are baselines.locate_edit.EditorConfig's
    fields (v* as ROME's GPT-2 XL values)."""

    layer: str = ""
    layer_from: str = "saliency"
    texts: str = "wikitext"
    band: int = 3
    cov_tokens: int = 100_000
    n_prefixes: int = 20
    batch_size: int = _EDIT.batch_size
    v_steps: int = _EDIT.value.v_steps
    v_lr: float = _EDIT.value.v_lr
    kl_factor: float = _EDIT.value.kl_factor
    weight_decay: float = _EDIT.value.weight_decay
    clamp_norm_factor: float = _EDIT.value.clamp_norm_factor
    clamp_norm: str = _EDIT.value.clamp_norm  # "output" (ROME: |o|) | "residual" (MEMIT / AlphaEdit: |h0|)
    memit_lambda: float = _EDIT.memit_lambda
    emmet_lambda: float = _EDIT.emmet_lambda
    alpha_energy: float = _EDIT.alpha_energy
    alpha_threshold: float = _EDIT.alpha_threshold
    alpha_l2: float = _EDIT.alpha_l2
    alpha_preserve: int = 0  # AlphaEdit: its memory starts with the keys of this many train fail rows (0: empty)
    # AlphaEdit: its memory also starts with the keys of country facts ("countries:REL,REL") outside the keep set
    # (no keep prompt, no keep row's country; methods.locate_edit.preserved_fact_requests); '' = none
    alpha_preserve_facts: str = ""
    alpha_preserve_facts_max: int = 0  # at most this many of them (a seeded sample); 0 = every usable one
    # AlphaEdit: the weight of those seeded keys' term (K_f K_f^T) in the memory; the edits' own keys keep weight 1
    alpha_preserve_weight: float = 1.0
    # AlphaEdit, HARD protection of those facts (needs alpha_preserve_facts; 0 = off): their keys also enter the
    # covariance whose null space the projector spans, C' = C_text + w_p C_facts (per-token means,
    # methods.locate_edit.facts_projections); with alpha_threshold (absolute) the null space can only shrink, with
    # alpha_energy (a trace share) the budget grows with the facts' trace; null dims with / without in the info
    alpha_project_facts_weight: float = 0.0
    # edit until reached (`mend.retry.edit_until_reached`): after each edit call, the rows whose own prompt still
    # misses its target are edited again on the edited weights (the editor's state continued), at most this many
    # more times; a retry is kept only when it reaches more rows. 0 = one call, as published
    retries: int = 0


@dataclasses.dataclass(frozen=True)
class Eval:
    """The evaluation: at most max_edits val fail rows edited one at a time, max_pass pass rows for the
    drawdown, held-out text perplexity for the first ppl_edits edits. keep: a held-out keep set
    (salem_jax.eval.keep): '' = none; "countries:REL,REL" = those relations of the country data; else a
    data name/path read with keep_format ('' = format); up to max_keep rows the base model gets right.
    generate: also score greedy generations of each edit prompt and its rephrasings (salem_jax.eval.generated),
    gen_extra_tokens past the target's length; ROME's generation fluency on CounterFact's generation_prompts
    (fluency_prompts per edit, fluency_tokens new tokens) for the first fluency_edits edits (0 = off).
    sequential: "T1,T2,..." = also edit the val fail rows one after another and score after T edits
    (salem_jax.eval.sequential) in each of sequential_modes (sequential | independent | batch); '' = off.
    sequential_order_seed: the order of those edits: -1 (the default) = the val fail rows' record order (as
    before the key existed); an integer >= 0 = the same first max(T) fail rows applied in the order
    numpy.random.default_rng(seed).permutation(max(T)) (`eval.sequential.order_edits`), each with its
    rephrasings; the train/val split, pass rows, keep set and every other seeded step stay as they are (the
    top-level seed would redraw the split, so another edit set). "EA first 10" is over the first 10 edits
    of that order; the seed and the edit order (row ids) are written to many_edits_<method>.json.
    mend_edit_scale: the MEND-based methods' edits times this (W - s * lr_W * pseudo_grad;
    `mend.apply.scaled_editor`): 1 = the trained editor's own edit; the editor trains at 1 either way.
    mend_edit_retries: the MEND-based methods apply the editor again on the weights an edit produced,
    at most this many more times, while that edit's own prompt does not give its target (teacher forced,
    the EA criterion; `mend.retry`): 0 (the default) = each edit applied once, as the editor was
    trained; a retry is kept only when it reaches the target (else the first application is evaluated);
    each edit's applications are written to results.json (`edit_retries`, per_edit `applications` and
    `applications_tried`).
    mend_null_energy: > 0 = project each MEND edit's delta on every edited kernel onto the null space of
    that kernel's input covariance over WikiText (AlphaEdit's P; the null space = C's smallest
    eigen-directions holding at most this share of trace(C); `mend.nullspace`), mend_null_tokens tokens
    of it (cached with the key statistics); 0 = off (the edit unchanged); evaluation only (the same P inside
    the editor's training: config.editor.null_energy, `TrainConfig.null_energy`; the two are exclusive).
    batch_edits: causal LMs: apply every edit first, then score them in vmapped calls of up to 8 edits
    and generate before/after all edits in one batched call (the same numbers); False: score and
    generate each edit in its own call (session 12 measured the batched warm calls 0.61-0.74x of
    the per-edit ones, with fewer compilations: README "the main job's stages outside the editor").
    keep_split: a country keep set's rows of each relation also reported as a group of their own
    (`keep_REL/*`, `dd_keep_acc_REL`; the same rows, scored once); off by default.
    keep_seed: the seed of the keep set's sample (a country keep set's seeded record draws and the
    order in which `keep_rows` takes the rows the model gets right); -1 (the default) = the top-level
    seed. Another value keeps the split, the edits and every other seeded step and changes only which
    facts are kept - and so, by their exclusion of keep countries, the null-space fact rows."""

    max_edits: int = 20
    max_pass: int = 48
    ppl_edits: int = 5
    text: str = "wikitext"
    n_texts: int = 8
    text_window: int = 128
    batch_size: int = 8
    keep: str = ""
    keep_format: str = ""
    max_keep: int = 48
    generate: bool = True
    gen_extra_tokens: int = 2
    fluency_edits: int = 5
    fluency_prompts: int = 2
    fluency_tokens: int = 32
    sequential: str = ""
    sequential_modes: str = "sequential,independent,batch"
    sequential_order_seed: int = -1
    mend_edit_scale: float = 1.0
    mend_edit_retries: int = 0
    mend_null_energy: float = 0.0
    mend_null_tokens: int = 100_000
    batch_edits: bool = True
    keep_split: bool = False
    keep_seed: int = -1


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """The whole pipeline (salem_jax.pipeline.run_pipeline).

    model: a load_model name/path, or "tiny-ARCH" (gpt2, gpt_neo, t5, bart, bert, llama).
    data: "countries", a known data-file name (zsre, counterfact, ...) or a path; format: the reader
    (countries | zsre | counterfact | fever | nli | text); relation: countries only; mode: correction |
    counterfactual; limit: records to read (0 = all); data_dir: '' = SALEM_JAX_DATA or ../shared/data;
    skip_invalid: records too long for the model are skipped (and counted) instead of an error.
    mesh_model: 0 = the model replicated on every device, the editor step data parallel (1-D mesh);
    N >= 1 = the model's weights sharded over a (data, N) mesh (salem_jax.sharding).
    fixed_layers: mend_fixed (and ke / enn) edit the last N blocks.
    train_pass: '' = none; "countries:REL,REL" = extra pass rows (locality KL) in the editors' training
    split: up to max_train_pass facts of those relations the base model knows, of TRAIN countries
    only, disjoint from the keep set and the val countries (salem_jax.pipeline.train_pass_set). They
    join the edit set's pass rows in one pool, or, with editor.extra_pass_per_group = Q > 0, form a
    pool of their own: each edit group then holds editor.pass_per_group edit-set pass rows plus Q
    of these (a per-group mix)."""

    name: str = "salem"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    data: str = "countries"
    format: str = "countries"
    relation: str = "capital"
    mode: str = "correction"
    limit: int = 0
    data_dir: str = ""
    seed: int = 0
    val_fraction: float = 0.1
    score_batch: int = 16
    skip_invalid: bool = False
    saliency: Saliency = Saliency()
    editability: EditabilityConfig = EditabilityConfig()
    editor: TrainConfig = CPU_EDITOR
    methods: tuple[str, ...] = ("salem",)
    mesh_model: int = 0
    fixed_layers: int = 3
    train_pass: str = ""
    max_train_pass: int = 96
    ft: FTConfig = PIPELINE_FT
    ke: KEConfig = PIPELINE_KE
    enn: ENNConfig = PIPELINE_ENN
    trace: Trace = Trace()
    rome: Rome = Rome()
    locate_edit: LocateEdit = LocateEdit()
    eval: Eval = Eval()
    progress: bool = True


def _section(value) -> dict[str, Any]:
    if isinstance(value, TrainConfig):  # the pipeline's editor seed: the top-level one unless set
        return {**editor_values(value), EDITOR_SEED_KEY: EDITOR_SEED_TOP}
    if isinstance(value, Rome):
        return dict(layer=value.layer, covariance=value.covariance, **dataclasses.asdict(value.edit))
    return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}


def to_config_dict(p: Pipeline = Pipeline()) -> ml_collections.ConfigDict:
    """The ConfigDict every experiment edits: the fields of `p`, each section a nested ConfigDict."""
    c = ml_collections.ConfigDict()
    for f in dataclasses.fields(p):
        v = getattr(p, f.name)
        c[f.name] = ml_collections.ConfigDict(_section(v)) if dataclasses.is_dataclass(v) else v
    return c


def default_config() -> ml_collections.ConfigDict:
    """The pipeline's defaults (`Pipeline()`) as a ConfigDict."""
    return to_config_dict(Pipeline())
