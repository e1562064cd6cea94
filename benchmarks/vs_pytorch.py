"""Benchmark: salem-jax against an eager PyTorch *reference* of the same work, in the same run.

    python benchmarks/vs_pytorch.py --out runs/bench-vs-pytorch.json            # SmolLM2, layers.15
    python benchmarks/vs_pytorch.py --layers layers.0 layers.15 layers.27-29     # more layer sets
    python benchmarks/vs_pytorch.py --quick                                      # tiny model, a smoke run

The PyTorch side (`TorchMEND` below) is a reference written for this benchmark, not a port of
any project's code: transformers' `LlamaForCausalLM` with the very weights salem-jax uses
(`llama.params_to_hf`), MEND's editor with the same shapes (rank 1920, combined u|delta input,
one hidden layer, per-weight scale/shift, running normalisation, learned edit lrs), the same
rows and the same loss (c_fail * NLL of fail + rephrase rows + c_loc * KL on pass rows), Adam
with global-norm clipping. Capture reads u and delta with hooks on the edited `nn.Linear`s and
only those weights require gradients, so its backward stops at the edited layer, as XLA's does.
It runs eagerly with `torch.set_num_threads` equal to the CPU cores (what XLA:CPU uses) and
with 1 thread; the ratio takes the faster of the two (on a loaded machine OpenMP's spinning
threads can slow the multi-threaded reference many times over).

Measured, each as the median of --repeats calls after a warm-up call:
  editor_step      one training step, 1 group (1 edit + 2 rephrases + 1 pass row)
  edit_1, edit_10  applying the editor to 1 / 10 requests (gradient pass + editor), batch mode
  val_<n>          the editor's validation over n groups (`mend.train.evaluate` vs a loop)
  saliency_row     the saliency pass, per row (`saliency.saliency_stats` over a micro-batch of
                   8 rows vs a loop of one fwd+bwd per row over all MLP weights computing the
                   same statistics: |g|, |g W| and g^2 column means, and the gradient sum;
                   checked equal); `saliency_row_ref_one_stat`: against the reference of
                   sessions 4-18 (g^2 column means only: less work than salem-jax does);
                   `saliency_row_by_gradients`: the per-example-gradient step (`by_gradients=True`)
  fwd_bwd          a plain forward+backward of the mean NLL w.r.t. all parameters, 8 rows
and for salem-jax also the first call (trace + compile + run) and the "cached first call":
the first call again after `jax.clear_caches()`, served by the persistent compilation cache
(salem_jax.compile_cache) as a second run of a command would be.

Prints a table with ratios (PyTorch time / salem-jax time: > 1 means salem-jax is faster) and
the targets of issue 14, and writes everything with the hardware to --out (JSON). Timings on a
shared machine are only comparable within one run: both sides run here one after the other.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from salem_jax import saliency, sharding
from salem_jax.compile_cache import add_flag, enable_compile_cache
from salem_jax.losses import example_nll
from salem_jax.mend.apply import TrainedEditor, apply_edits, encode_requests
from salem_jax.mend.editor import EditorConfig, EditorSpec, weight_key
from salem_jax.mend.train import (
    TrainConfig,
    evaluate,
    fit_length,
    flat_train_sizes,
    from_block_plan,
    init_train_state,
    place_base_params,
    place_state,
    prepare_splits,
    train_batch,
    train_editor,
    train_step,
    val_batches,
    with_block_inputs,
    with_pass_logits,
)
from salem_jax.models import llama

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import FACTS, fact_rows  # noqa: E402  (a sibling script, not a package)

# ----------------------------------------------------------------------------- timing

TORCH_THREADS = os.cpu_count() or 1  # XLA:CPU uses every core of the machine
# the default path's clip: whatever train_editor does unless told otherwise
TRAIN_EDITOR_CLIP_FACTOR = inspect.signature(train_editor).parameters["clip_factor"].default


def _median_after_warmup(fn, repeats: int) -> tuple[float, float]:
    """(first call, median of `repeats` further calls) in seconds; fn blocks until done."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return first, statistics.median(runs)


def _torch_median(torch, fn, repeats: int) -> dict:
    """The PyTorch reference's median at 1 thread and at every core (what XLA:CPU uses), after a
    warm-up call each: {"threads": {n: s}, "best": s}. The ratio uses the better one - on a loaded
    machine OpenMP's spinning threads can make the multi-threaded reference many times slower,
    and a reference slowed by its setting would flatter salem-jax."""
    out = {}
    for n in sorted({1, TORCH_THREADS}):
        torch.set_num_threads(n)
        out[n] = _median_after_warmup(fn, repeats)[1]
    torch.set_num_threads(TORCH_THREADS)
    return {"threads": out, "best": min(out.values())}


CACHE_EVENTS: list[str] = []
jax.monitoring.register_event_listener(lambda name, **kw: CACHE_EVENTS.append(name) if "compilation_cache/cache_" in name else None)


def _cached_first(fn) -> float:
    """The first call again with jax's in-memory caches cleared: trace + load from the
    persistent compilation cache (+ run), as in a second process. Prints the cache's hits and
    misses during the call (a miss means it compiled again)."""
    jax.clear_caches()
    CACHE_EVENTS.clear()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    hits = sum(e.endswith("cache_hits") for e in CACHE_EVENTS)
    print(f"    (cached first call: {hits} cache hits, {len(CACHE_EVENTS) - hits} misses, {dt:.1f}s)", flush=True)
    return dt


# ----------------------------------------------------------------------------- the PyTorch reference


class TorchMEND:
    """MEND's editor and training step in eager PyTorch, for timing against salem-jax (a reference).

    Mirrors salem_jax.mend: capture (u, delta) of every edited kernel from one fwd+bwd of the
    summed per-example mean NLL; normalise with running statistics; the residual low-rank MLP
    on concat[u, delta] (shared by kernels of one shape, conditioned by per-kernel scale/shift);
    pseudo-gradient delta~^T u~ in nn.Linear's [out, in] layout; W - lr_W * G~."""

    def __init__(self, torch, model_pt, jax_editor_params, spec: EditorSpec, cfg: TrainConfig):
        self.torch, self.pt, self.spec, self.cfg = torch, model_pt, spec, cfg
        self.names = [self._torch_name(w.path) for w in spec.weights]
        self.modules = {n: model_pt.get_submodule(n[: -len(".weight")]) for n in self.names}
        for p in model_pt.parameters():
            p.requires_grad_(False)
        t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32, requires_grad=True)  # noqa: E731
        # the same initial values as the JAX editor (so the first steps agree)
        self.nets = {shape: {side: {layer: {k: t(v) for k, v in lp.items()} for layer, lp in sp.items()}
                             for side, sp in net.items()} for shape, net in jax_editor_params["nets"].items()}
        self.lr = {weight_key(w.path): t(jax_editor_params["lr"][weight_key(w.path)]) for w in spec.weights}
        self.norm = {}
        for i, w in enumerate(spec.weights):
            fi, fo = spec.fans(i)
            self.norm[weight_key(w.path)] = dict(count=0.0, u_mean=torch.zeros(fi), u_m2=torch.zeros(fi),
                                                 d_mean=torch.zeros(fo), d_m2=torch.zeros(fo))
        net_params = [x for net in self.nets.values() for sp in net.values() for lp in sp.values() for x in lp.values()]
        self.opt = torch.optim.Adam([{"params": net_params, "lr": cfg.lr}, {"params": list(self.lr.values()), "lr": cfg.lr_lr}])
        self.params = net_params + list(self.lr.values())

    @staticmethod
    def _torch_name(path: str) -> str:
        # "model/layers_15/mlp/gate_proj/kernel" -> "model.layers.15.mlp.gate_proj.weight"
        parts = path.split("/")
        out = []
        for p in parts[:-1]:
            out.extend(p.split("_", 1) if p.startswith("layers_") else [p])
        return ".".join(out + ["weight"])

    def t(self, batch: dict) -> dict:
        torch = self.torch
        return {k: torch.as_tensor(np.asarray(v)).long() for k, v in batch.items()}

    def logits(self, batch: dict, weights: dict | None = None):
        torch = self.torch
        if weights:
            return torch.func.functional_call(self.pt, weights, (batch["input_ids"],), {"attention_mask": batch["attention_mask"]}).logits
        return self.pt(batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    @staticmethod
    def _token_logp(torch, logits, labels):
        return torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None])[..., 0]

    def example_nll(self, logits, batch):
        m = batch["label_mask"].float()
        nll = -self._token_logp(self.torch, logits, batch["labels"]) * m
        return nll.sum(-1) / m.sum(-1).clamp(min=1.0)

    def batch_nll(self, logits, batch):
        per = self.example_nll(logits, batch)
        has = (batch["label_mask"].sum(-1) > 0).float()
        return (per * has).sum() / has.sum().clamp(min=1.0)

    def kl(self, base_logits, new_logits, mask):
        torch = self.torch
        m = mask.float()
        p = torch.log_softmax(base_logits.float(), -1)
        q = torch.log_softmax(new_logits.float(), -1)
        return ((p.exp() * (p - q)).sum(-1) * m).sum() / m.sum().clamp(min=1.0)

    def capture(self, batch: dict) -> dict:
        """{weight name: (u [B, T, in], delta [B, T, out])} from one fwd + bwd (down to the edited layer)."""
        store, handles = {}, []
        for n, mod in self.modules.items():
            mod.weight.requires_grad_(True)

            def hook(module, args, out, n=n):
                store[n] = [args[0].detach()]
                out.register_hook(lambda g, n=n: store[n].append(g.detach()))

            handles.append(mod.register_forward_hook(hook))
        try:
            loss = self.example_nll(self.logits(batch), batch).sum()
            loss.backward()
        finally:
            for h in handles:
                h.remove()
            for mod in self.modules.values():
                mod.weight.requires_grad_(False)
                mod.weight.grad = None
        return {n: (store[n][0], store[n][1]) for n in self.names}

    def update_norm(self, factors: dict) -> None:
        torch = self.torch
        for w, n in zip(self.spec.weights, self.names):
            u, d = factors[n]
            u, d = u.reshape(-1, u.shape[-1]), d.reshape(-1, d.shape[-1])
            active = ((u != 0).any(-1) & (d != 0).any(-1)).float()[:, None]
            s = self.norm[weight_key(w.path)]
            nb = float(active.sum())
            for x, mk, vk in ((u, "u_mean", "u_m2"), (d, "d_mean", "d_m2")):
                mean = (x * active).sum(0) / max(nb, 1.0)
                m2 = (((x - mean) * active) ** 2).sum(0)
                tot = s["count"] + nb
                delta = mean - s[mk]
                s[mk] = s[mk] + delta * (nb / max(tot, 1.0))
                s[vk] = s[vk] + m2 + delta * delta * (s["count"] * nb / max(tot, 1.0))
            s["count"] += nb
        del torch

    def _mlp(self, layers: dict, x, mode: int):
        torch = self.torch
        n = len(layers)
        for j in range(n):
            p = layers[f"layer{j}"]
            h = x * p["scale"][mode] + p["shift"][mode]
            h = (h @ p["V"].T) @ p["U"].T + p["b"]
            if j < n - 1:
                h = torch.where(h >= 0, h, torch.zeros_like(h))
            x = x + h
        return x

    def edited_weights(self, factors: dict) -> dict:
        """{weight name: W - lr_W * G~} in the model's [out, in] layout (differentiable)."""
        torch, ecfg = self.torch, self.spec.config
        out = {}
        for i, (w, n) in enumerate(zip(self.spec.weights, self.names)):
            u, d = factors[n]
            u, d = u.reshape(-1, u.shape[-1]), d.reshape(-1, d.shape[-1])
            active = ((u != 0).any(-1) & (d != 0).any(-1)).float()[:, None]
            if ecfg.normalize:
                s = self.norm[weight_key(w.path)]
                if s["count"] >= 2:
                    den = max(s["count"] - 1.0, 1.0)
                    u = (u - s["u_mean"]) / ((s["u_m2"] / den).sqrt() + ecfg.norm_eps)
                    d = (d - s["d_mean"]) / ((s["d_m2"] / den).sqrt() + ecfg.norm_eps)
            y = self._mlp(self.nets[self.spec.shape_key(i)]["xd"], torch.cat([u, d], -1), self.spec.mode_index(i))
            ut, dt = y[:, : u.shape[-1]] * active, y[:, u.shape[-1]:] * active
            g = dt.T @ ut  # [out, in] = nn.Linear's layout
            out[n] = self.modules[n].weight - self.lr[weight_key(w.path)] * g
        return out

    def train_step(self, b: dict) -> float:
        """One step on one group: b holds torch tensors fail [k, S], edit [k(1+A), S], pass [P, S]."""
        torch, cfg = self.torch, self.cfg
        factors = self.capture(b["fail"])
        self.update_norm(factors)
        with torch.no_grad():
            base_pass = self.logits(b["pass"])
        new = self.edited_weights(factors)
        nll = self.batch_nll(self.logits(b["edit"], new), b["edit"])
        kl = self.kl(base_pass, self.logits(b["pass"], new), b["pass"]["label_mask"])
        loss = cfg.c_fail * nll + cfg.c_loc * kl
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.opt.step()
        return float(loss.detach())

    def apply_edit(self, batch: dict) -> dict:
        torch = self.torch
        factors = self.capture(batch)
        with torch.no_grad():
            return self.edited_weights(factors)

    def val_group(self, b: dict) -> dict:
        """Score one validation group as `mend.train.eval_step` does."""
        torch = self.torch
        factors = self.capture(b["fail"])
        with torch.no_grad():
            base_pass = self.logits(b["pass"])
            base_edit = self.logits(b["edit"])
            new = self.edited_weights(factors)
            el, pl = self.logits(b["edit"], new), self.logits(b["pass"], new)
            nll = self.batch_nll(el, b["edit"])
            kl = self.kl(base_pass, pl, b["pass"]["label_mask"])
            return {"loss": float(self.cfg.c_fail * nll + self.cfg.c_loc * kl),
                    "edit_correct": (el.argmax(-1) == b["edit"]["labels"]).numpy(),
                    "edit_before": (base_edit.argmax(-1) == b["edit"]["labels"]).numpy()}


def torch_saliency_row(torch, pt, mlp_names: list[str], row: dict, sums: dict | None = None) -> dict:
    """One row's fwd+bwd w.r.t. every MLP weight, then per-weight column statistics: the eager
    loop of one pass per record.

    sums None: the squared-gradient column means only (the reference of sessions 4-18, less work
    than salem-jax's pass). sums a dict: the same work as `saliency.saliency_stats` (default
    track_mean=True): the column means of |g|, |g * W| and g^2 of every weight (a torch Linear
    weight is [out, in]: column j = W[j, :]), and g added to `sums[name]` (the group's gradient
    sum)."""
    ws = [pt.get_submodule(n[: -len(".weight")]).weight for n in mlp_names]
    for w in ws:
        w.requires_grad_(True)
    logits = pt(row["input_ids"], attention_mask=row["attention_mask"]).logits
    m = row["label_mask"].float()
    nll = -(torch.log_softmax(logits, -1).gather(-1, row["labels"][..., None])[..., 0] * m).sum() / m.sum().clamp(min=1.0)
    grads = torch.autograd.grad(nll, ws)
    for w in ws:
        w.requires_grad_(False)
    if sums is None:
        return {n: (g * g).mean(0) for n, g in zip(mlp_names, grads)}
    out = {}
    with torch.no_grad():
        for n, g, w in zip(mlp_names, grads, ws):
            a = g.abs()
            out[n] = (a.mean(1), (a * w.abs()).mean(1), (g * g).mean(1))
            if n in sums:
                sums[n] += g
            else:
                sums[n] = g.clone()
    return out


# ----------------------------------------------------------------------------- the benchmark


def _torch_batch(torch, b: dict) -> dict:
    return {k: torch.as_tensor(np.asarray(v)).long() for k, v in b.items()}


def _group(torch, batch: dict, g: int) -> dict:
    return {part: _torch_batch(torch, {k: v[g] for k, v in batch[part].items()}) for part in ("fail", "edit", "pass")}


def bench_layers(model, pt, torch, layers: list[str], args) -> dict:
    params = model.params
    ecfg = EditorConfig(rank=32) if args.quick else EditorConfig()
    spec = EditorSpec.from_params(model.layers.weights(layers), params, ecfg)
    cfg = TrainConfig(editor=ecfg, batch_size=1, adapt_per_edit=2, pass_per_group=1, effective_batch=1,
                      val_groups=args.val_groups).resolved(1)
    data = prepare_splits(model, {"train": fact_rows(16), "val": fact_rows(args.val_groups)})
    batch = train_batch(data["train"], cfg, 0)
    mesh = sharding.make_mesh(1, 1, jax.devices()[:1])
    base = place_base_params(model, params, mesh)
    kw = dict(apply_fn=model.apply, spec=spec, cfg=cfg.step_config(), mesh=mesh)
    fresh = jax.device_get(init_train_state(spec, cfg))  # host copies: the step donates its device state
    ref = TorchMEND(torch, pt, fresh["params"], spec, cfg)
    out: dict = {"layers": layers, "editor_params": int(sum(x.size for x in jax.tree.leaves(fresh["params"])))}

    # -- editor step: the path train_editor takes (from the first edited block, hidden states kept
    # for the edit set, when the model and layers qualify) and, with --every-block, the step that
    # runs every block (before issue 14's from-block step), in the same run
    plan, why = from_block_plan(model, spec, data["train"])
    out["from_block"] = {"start": plan.start, "n_blocks": plan.n_blocks} if plan else {"why_not": why}
    print(f"  from block: {f'blocks {plan.start}..{plan.n_blocks - 1} run' if plan else 'every block runs: ' + why}", flush=True)
    d_train = with_block_inputs(plan, base, data["train"]) if plan else data["train"]
    # (name, plan, data, flat sizes, cut to the longest row, clip_factor): "editor_step" is the step
    # doing the reference's work (every row's logits at K positions, capture and base pass in the
    # step, optax's clip-then-Adam); "editor_step_main_path" the step `train_editor` runs by
    # default: LM head on the target tokens only, the pass rows' base logits kept once per edit set,
    # each batch cut after its longest row, the clip as one factor in Adam's update (whatever
    # train_editor's default is) - the same numbers up to float rounding with less work, against
    # the same reference
    variants = [("editor_step", plan, d_train, None, False, False)]
    if not args.no_main_path:
        variants.append(("editor_step_main_path", plan, with_pass_logits(model.apply, base, d_train, plan),
                         flat_train_sizes(d_train, cfg, 300), True, TRAIN_EDITOR_CLIP_FACTOR))
    if args.every_block and plan is not None:
        variants.append(("editor_step_every_block", None, data["train"], None, False, False))
    tb = _group(torch, batch, 0)
    if args.val_only:
        variants = []
    else:
        loss_pt0 = ref.train_step(tb)  # warm-up; also the first step's loss, to compare with JAX's
        pt_t = _torch_median(torch, lambda: ref.train_step(tb), args.repeats)
        run_pt = pt_t["best"]
    for name, p, d, flat, cut, clip_factor in variants:
        vkw = dict(kw, from_block=p, clip_factor=clip_factor)
        holder = {"state": place_state(fresh, mesh)}
        gb = train_batch(d, cfg, 0, flat)
        gb = sharding.shard_batch(fit_length(gb) if cut else gb, mesh)

        def jax_step():
            holder["state"], m = train_step(holder["state"], base, gb, **vkw)
            return jax.block_until_ready(m)

        first, run = _median_after_warmup(jax_step, args.repeats)
        loss_jax = float(jax_step()["loss"])
        cached = _cached_first(jax_step) if name == "editor_step" and not args.no_cached_first else float("nan")
        compiled = train_step.lower(place_state(fresh, mesh), base, gb, **vkw).compile()
        ca = compiled.cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        first_jax_loss = float(jax.device_get(train_step(place_state(fresh, mesh), base, gb, **vkw)[1])["loss"])
        out[name] = {"jax_s": run, "torch_s": run_pt, "torch_by_threads": pt_t["threads"], "first_s": first, "cached_first_s": cached,
                     "gflop": float(ca.get("flops", float("nan"))) / 1e9, "gbytes": float(ca.get("bytes accessed", float("nan"))) / 1e9,
                     "first_step_loss": {"jax": first_jax_loss, "torch": loss_pt0}, "later_loss_jax": loss_jax}
        print(f"  {name}: jax {run:.3f}s torch {run_pt:.3f}s (first {first:.1f}s, cached first {cached:.1f}s; "
              f"{out[name]['gflop']:.1f} GFLOP, {out[name]['gbytes']:.2f} GB); "
              f"first-step loss jax {first_jax_loss:.5f} torch {loss_pt0:.5f}", flush=True)
    # -- edits and validation: the editor at its initial values on both sides (costs do not
    # depend on them; the reference above was trained by its steps, so take a fresh one)
    ref = TorchMEND(torch, pt, fresh["params"], spec, cfg)
    ed = TrainedEditor(spec=spec, params=fresh["params"], state=fresh["norm"], model_name=model.name, step=0)
    for n in () if args.steps_only or args.val_only else (1, 10):
        reqs = [(f"The capital of {c} is", " " + cap) for c, cap in (FACTS * 2)[:n]]

        def jax_edit(reqs=reqs):
            new = apply_edits(model, ed, reqs, params=params, progress=False)
            return jax.block_until_ready([sharding.get_path(new, w.path) for w in spec.weights])

        first, run = _median_after_warmup(jax_edit, args.repeats)
        cached = _cached_first(jax_edit)

        def pt_edit(reqs=reqs):
            return ref.apply_edit(_torch_batch(torch, encode_requests(model, reqs)))

        pt_t = _torch_median(torch, pt_edit, args.repeats)
        run_pt = pt_t["best"]
        # the same edited kernels (identity editor, no statistics yet: one scaled gradient step)
        new_j = apply_edits(model, ed, reqs, params=params, progress=False)
        new_t = pt_edit()
        diff = max(float(np.abs(np.asarray(sharding.get_path(new_j, w.path)).T - new_t[nm].numpy()).max())
                   for w, nm in zip(spec.weights, ref.names))
        out[f"edit_{n}"] = {"jax_s": run, "torch_s": run_pt, "torch_by_threads": pt_t["threads"], "first_s": first, "cached_first_s": cached, "max_kernel_diff": diff}
        print(f"  edit x{n}: jax {run:.3f}s torch {run_pt:.3f}s (first {first:.1f}s, cached {cached:.1f}s); "
              f"kernels differ by {diff:.2e}", flush=True)

    # -- validation over val_groups groups (as train_editor validates: from the edited block when
    # the model qualifies, the hidden states kept; with --every-block also the old path)
    st = place_state(fresh, mesh)
    val_data = with_block_inputs(plan, base, data["val"]) if plan else data["val"]
    vb = val_batches(data["val"], cfg)

    def pt_val():
        return [ref.val_group(_group(torch, b, 0)) for b in vb if b["weight"][0] > 0]

    pt_t = _torch_median(torch, pt_val, max(1, args.repeats // 2)) if not args.no_torch_val else {"threads": {}, "best": float("nan")}
    run_pt = pt_t["best"]
    # val_<n>_base_kept: as train_editor's second and later validations, the base model's side of
    # every batch computed by the warm-up call and reused (`evaluate(..., base_cache=...)`)
    # with --val-kpos also both with the LM head at K positions of every row (flat_head=False, the
    # path before issue 14's session 10), same run; their summaries must equal the default's
    base_cache: dict = {}
    rows = [(f"val_{args.val_groups}", plan, val_data, None, True), (f"val_{args.val_groups}_base_kept", plan, val_data, base_cache, True)]
    if args.val_kpos:
        rows += [(f"val_{args.val_groups}_kpos", plan, val_data, None, False), (f"val_{args.val_groups}_base_kept_kpos", plan, val_data, {}, False)]
    if args.every_block and plan:
        rows.append((f"val_{args.val_groups}_every_block", None, data["val"], None, True))
    summaries = {}
    for name, p, d, bc, fh in rows:

        def jax_val(p=p, d=d, bc=bc, fh=fh):
            return evaluate(model, spec, cfg, mesh, st["params"], st["norm"], base, d, plan=p, skip_unchanged_blocks=p is not None,
                            base_cache=bc, flat_head=fh)

        summaries[name] = jax_val()
        if name.endswith("_kpos"):
            ref_s = summaries[name[: -len("_kpos")]]
            bad = {k: (v, ref_s[k]) for k, v in summaries[name].items() if not np.isclose(v, ref_s[k], rtol=1e-4, atol=1e-6, equal_nan=True)}
            if bad:
                raise SystemExit(f"{name}: the validation differs from the flat head's: {bad}")

        first, run = _median_after_warmup(jax_val, max(1, args.repeats // 2))
        cached = _cached_first(jax_val) if p is plan and bc is None and not args.no_cached_first else float("nan")
        out[name] = {"jax_s": run, "torch_s": run_pt, "torch_by_threads": pt_t["threads"], "first_s": first, "cached_first_s": cached}
        print(f"  {name}: jax {run:.2f}s torch {run_pt:.2f}s (first {first:.1f}s)", flush=True)
    return out


def bench_model_wide(model, pt, torch, args) -> dict:
    """Saliency per row and a plain fwd+bwd: not specific to a layer."""
    out = {}
    reqs = [(f"The capital of {c} is", " " + cap) for c, cap in FACTS[:8]]
    rows = {k: np.asarray(v) for k, v in encode_requests(model, reqs).items()}
    n = rows["input_ids"].shape[0]

    def jax_sal():
        return jax.block_until_ready(saliency.saliency_stats(model, model.params, rows, micro_batch=n, progress=False).per_example)

    first, run = _median_after_warmup(jax_sal, args.repeats)
    cached = _cached_first(jax_sal)
    mlp = [TorchMEND._torch_name(w.path) for b in model.layers.blocks for w in b.mlp]
    tr = _torch_batch(torch, rows)

    def pt_sal(same_work=True):
        sums = {} if same_work else None
        return [torch_saliency_row(torch, pt, mlp, {k: v[i: i + 1] for k, v in tr.items()}, sums) for i in range(n)]

    # the same work on both sides: check the reference's per-row layer scores against salem-jax's
    ref_rows = pt_sal()
    ours = jax_sal()
    for name_i, key in enumerate(("salem", "grad_x_weight", "mean_sq")):
        ref = np.asarray([[np.concatenate([r[TorchMEND._torch_name(w.path)][name_i].numpy() for w in b.mlp]).mean()
                           for b in model.layers.blocks] for r in ref_rows])
        err = float(np.max(np.abs(ref - ours[key]) / np.abs(ours[key])))
        if err > 1e-3:
            raise RuntimeError(f"saliency reference disagrees with salem-jax on {key}: max rel err {err:.2e}")
    pt_t = _torch_median(torch, pt_sal, args.repeats)
    run_pt = pt_t["best"]
    out["saliency_row"] = {"jax_s": run / n, "torch_s": run_pt / n, "torch_by_threads": pt_t["threads"], "first_s": first, "cached_first_s": cached, "rows": n}
    print(f"  saliency per row: jax {run / n:.3f}s torch {run_pt / n:.3f}s (the same statistics and gradient sums)", flush=True)
    pt_1 = _torch_median(torch, lambda: pt_sal(False), args.repeats)
    out["saliency_row_ref_one_stat"] = {"jax_s": run / n, "torch_s": pt_1["best"] / n, "torch_by_threads": pt_1["threads"], "rows": n}
    print(f"  saliency per row against the one-statistic reference (sessions 4-18): torch {pt_1['best'] / n:.3f}s", flush=True)

    def jax_sal_grads():  # the per-example-gradient step (sharded parameters' path; the one-device path before session 19)
        return jax.block_until_ready(saliency.saliency_stats(model, model.params, rows, micro_batch=n, progress=False, by_gradients=True).per_example)

    first_g, run_g = _median_after_warmup(jax_sal_grads, args.repeats)
    out["saliency_row_by_gradients"] = {"jax_s": run_g / n, "torch_s": run_pt / n, "first_s": first_g, "rows": n}
    print(f"  saliency per row, per-example-gradient step: jax {run_g / n:.3f}s", flush=True)

    apply = model.apply

    @jax.jit
    def fb(p, b):
        return jax.grad(lambda p: example_nll(apply(p, b), b["labels"], b["label_mask"]).mean())(p)

    jr = {k: jnp.asarray(v) for k, v in rows.items()}
    first, run = _median_after_warmup(lambda: jax.block_until_ready(fb(model.params, jr)), args.repeats)
    cached = _cached_first(lambda: jax.block_until_ready(fb(model.params, jr)))

    def pt_fb():
        for p in pt.parameters():
            p.requires_grad_(True)
            p.grad = None
        logits = pt(tr["input_ids"], attention_mask=tr["attention_mask"]).logits
        m = tr["label_mask"].float()
        nll = (-(torch.log_softmax(logits, -1).gather(-1, tr["labels"][..., None])[..., 0]) * m).sum(-1) / m.sum(-1).clamp(min=1)
        nll.mean().backward()
        for p in pt.parameters():
            p.requires_grad_(False)

    pt_t = _torch_median(torch, pt_fb, args.repeats)
    run_pt = pt_t["best"]
    out["fwd_bwd"] = {"jax_s": run, "torch_s": run_pt, "torch_by_threads": pt_t["threads"], "first_s": first, "cached_first_s": cached, "rows": n}
    print(f"  fwd+bwd ({n} rows): jax {run:.3f}s torch {run_pt:.3f}s", flush=True)
    return out


def _layer_list(spec: str) -> list[str]:
    """"layers.27-29" -> [layers.27, layers.28, layers.29]; "layers.15" -> [layers.15]."""
    name, _, idx = spec.rpartition(".")
    if "-" in idx:
        a, b = (int(x) for x in idx.split("-"))
        return [f"{name}.{i}" for i in range(a, b + 1)]
    return [spec]


def _measured(layers: dict):
    """The per-layer results, or KeyError when none were run (`--layers` alone): a target over
    no layers is "not measured", never met."""
    if not layers:
        raise KeyError("no layer sets in this run")
    return layers.values()


TARGETS = {  # issue 14 (same run, this CPU)
    "editor step >= 2x faster than the reference": lambda r: all(v["editor_step"]["torch_s"] / v["editor_step"]["jax_s"] >= 2
                                                                 for v in _measured(r["layers"])),
    "editor step (train_editor's default path) >= 2x faster than the reference": lambda r: all(
        v["editor_step_main_path"]["torch_s"] / v["editor_step_main_path"]["jax_s"] >= 2 for v in _measured(r["layers"])),
    "one edit <= 0.10 s and >= 3x faster": lambda r: all(v["edit_1"]["jax_s"] <= 0.10 and v["edit_1"]["torch_s"] / v["edit_1"]["jax_s"] >= 3
                                                         for v in _measured(r["layers"])),
    "10 edits <= 0.3 s": lambda r: all(v["edit_10"]["jax_s"] <= 0.3 for v in _measured(r["layers"])),
    "validation of 19 groups <= 5 s": lambda r: all(v.get("val_19", {"jax_s": float("inf")})["jax_s"] <= 5 for v in _measured(r["layers"])),
    "saliency per row >= 2x faster": lambda r: r["model_wide"]["saliency_row"]["torch_s"] / r["model_wide"]["saliency_row"]["jax_s"] >= 2,
    "cached first editor step <= 3 s": lambda r: all(v["editor_step"]["cached_first_s"] <= 3 for v in _measured(r["layers"])),
}


def print_table(rep: dict) -> None:
    print(f"\n{rep['model']} on {rep['hardware']} ({rep['devices']} x {rep['platform']}, torch threads {rep['torch_threads']} or 1, the faster, "
          f"load average at start {rep['load_average_start']})")
    print(f"{'work':44s} {'salem-jax s':>11s} {'PyTorch ref s':>13s} {'ratio':>7s} {'first s':>8s} {'cached first s':>14s}")

    def row(label, m):
        print(f"{label:44s} {m['jax_s']:11.3f} {m['torch_s']:13.3f} {m['torch_s'] / m['jax_s']:6.2f}x "
              f"{m.get('first_s', float('nan')):8.1f} {m.get('cached_first_s', float('nan')):14.1f}")

    for key, r in rep["layers"].items():
        for op, m in r.items():
            if isinstance(m, dict) and "jax_s" in m:
                row(f"{op} ({key})", m)
    for op, m in rep["model_wide"].items():
        row(op, m)
    for name, status in rep["targets"].items():
        print(f"target: {name}: {'not measured in this run' if status is None else 'met' if status else 'NOT met'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", nargs="*", default=["layers.15"],
                    help="layer sets, e.g. layers.0 layers.15 layers.27-29; none (`--layers` alone): only saliency and fwd+bwd")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--val-groups", type=int, default=19)
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama (smoke run)")
    ap.add_argument("--every-block", action="store_true",
                    help="also time the editor step and validation running every block (the path before the from-block step)")
    ap.add_argument("--steps-only", action="store_true", help="only the editor step and the validation (no edits, saliency, fwd+bwd)")
    ap.add_argument("--no-torch-val", action="store_true", help="skip the PyTorch reference's validation (minutes of eager passes)")
    ap.add_argument("--no-cached-first", action="store_true", help="skip the cached-first-call measurements (they clear jax's caches)")
    ap.add_argument("--val-only", action="store_true", help="only the validation rows (no editor step, edits, saliency, fwd+bwd)")
    ap.add_argument("--no-main-path", action="store_true", help="skip the editor step of train_editor's default path (flat head, kept pass logits, cut rows)")
    ap.add_argument("--val-kpos", action="store_true",
                    help="also time the validation with the LM head at K positions of every row (flat_head=False, the path before)")
    ap.add_argument("--out", default="runs/bench-vs-pytorch.json")
    add_flag(ap)
    args = ap.parse_args(argv)
    enable_compile_cache(enabled=not args.no_compile_cache)
    import torch  # optional dependency (the [torch] extra): only this benchmark needs it

    threads = TORCH_THREADS
    torch.set_num_threads(threads)
    from salem_jax.models import load_model

    t0 = time.perf_counter()
    model = llama.tiny_llama(hidden_size=64, intermediate_size=256) if args.quick else load_model(args.model)
    import transformers

    hf_cfg = llama.hf_config(model.config)  # a cached GGUF model's config is llama.JsonLlamaConfig
    cfg = hf_cfg.__class__.from_dict(hf_cfg.to_dict())
    cfg._attn_implementation = "eager"
    pt = transformers.LlamaForCausalLM(cfg).eval()
    sd = {k: torch.tensor(v) for k, v in llama.params_to_hf(model.params, model.config).items()}
    pt.load_state_dict(sd, strict=False)
    if getattr(model.config, "tie_word_embeddings", False):
        pt.tie_weights()
    print(f"{model.name} loaded in {time.perf_counter() - t0:.0f}s (JAX and the PyTorch reference)", flush=True)
    rep = {"model": model.name, "platform": jax.devices()[0].platform, "devices": len(jax.devices()),
           "hardware": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores", "jax": jax.__version__,
           "torch": torch.__version__, "torch_threads": threads, "load_average_start": [round(x, 2) for x in os.getloadavg()],
           "args": vars(args), "layers": {}}
    for spec in args.layers:
        layers = [f"layers.{min(int(x.split('.')[-1]), len(model.layers.names()) - 1)}" for x in _layer_list(spec)] if args.quick \
            else _layer_list(spec)
        layers = list(dict.fromkeys(layers))
        print(f"{spec} ({len(layers)} MLP block(s)) ...", flush=True)
        rep["layers"][spec] = bench_layers(model, pt, torch, layers, args)
    print("saliency and fwd+bwd ...", flush=True)
    rep["model_wide"] = {} if args.steps_only or args.val_only else bench_model_wide(model, pt, torch, args)
    rep["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    rep["targets"] = {}
    for name, check in TARGETS.items():
        try:
            rep["targets"][name] = bool(check(rep))
        except KeyError:  # its rows were not run (--steps-only, --val-only, ...)
            rep["targets"][name] = None
        except ZeroDivisionError:
            rep["targets"][name] = False
    print_table(rep)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rep, indent=2, default=float))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
