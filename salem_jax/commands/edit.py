"""`salem edit`: apply edit requests to a model with a trained editor and save the edited model.

    salem edit --model smollm2-135m --editor runs/editor-capitals --requests fixes.jsonl --out runs/smollm2-fixed

`--requests` is a JSON-lines file, one {"prompt": ..., "target": ...} per line, optionally with
"rephrases": [prompts that should give the same target] (held-out checks of generalisation: they
are scored before and after, never used for the edit). By default all
requests are applied together as one edit (`--mode batch`); `--mode sequential` applies them one
after another. The edited model is written to `--out` as a folder that transformers and
`salem_jax.models.load_model` open; the base model is untouched. For each request the command
prints whether the model gets the target right (every target token the argmax) before and after.

`--method rrome|memit|emmet|alphaedit` edits without a trained editor (locate-then-edit,
`salem_jax.baselines.editors`): each request also needs "subject" (requests without one, or whose
subject is not in the prompt, are skipped and counted), `--layers` names the layer (r-ROME) or
the last layer of the band (`--band` blocks), key statistics come from WikiText in the data
directory (cached), and `--batch-size` edits go into each closed-form update.

    salem edit --model smollm2-135m --method rrome --layers layers.7 --requests facts.jsonl --out runs/smollm2-rrome

`--layers auto --scorer NAME` chooses that layer from the requests themselves (each request a
`fail` row: its prompt with the new target; `--keep` facts are the `pass` rows that "contrast"
needs): a saliency scorer (salem = the paper's, lga, contrast, ...) or "causal-trace" (ROME's
causal tracing on the requests' subjects). The top-1 layer is the edited layer (r-ROME) or the last
block of the band; the profile is written to `<out>/layer_profile.json`.

    salem edit --model smollm2-135m --method rrome --layers auto --scorer causal-trace --requests facts.jsonl --out runs/smollm2-rrome
"""

from __future__ import annotations

# JAX, the models and the data-set code are imported inside `run` (heavy: seconds), not here:
# `salem --help` builds every command's parser (cli.build_parser) and answers without them.
import argparse
import json
from pathlib import Path

from salem_jax.data.tokenize import DEFAULT_MAX_TOKENS
from salem_jax.commands.locate import SCORERS as SALIENCY_SCORERS  # no jax import: `salem --help` stays fast

AUTO_SCORERS = SALIENCY_SCORERS + ("causal-trace",)  # salem edit --layers auto --scorer NAME


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "edit",
        help="apply edit requests with a trained editor and save the edited model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="the base model (name, folder, .gguf file or hub id)")
    p.add_argument("--method", choices=("mend", "rrome", "memit", "emmet", "alphaedit"), default="mend",
                   help="mend: a trained editor (--editor); the others edit in closed form (--layers)")
    p.add_argument("--editor", default=None, help="workdir of `salem train-editor` (or its checkpoints folder)")
    p.add_argument("--layers", default=None,
                   help="rrome/memit/emmet/alphaedit: the layer (or comma list of layers), or 'auto' (chosen by --scorer)")
    p.add_argument("--scorer", choices=AUTO_SCORERS, default="salem",
                   help="--layers auto: a saliency scorer (salem = the paper's) or causal-trace (needs each request's subject)")
    p.add_argument("--band", type=int, default=3, help="memit/emmet/alphaedit: blocks ending at --layers")
    p.add_argument("--batch-size", type=int, default=100, help="memit/emmet/alphaedit: edits per update")
    p.add_argument("--cov-tokens", type=int, default=100_000, help="WikiText tokens for the key statistics")
    p.add_argument("--requests", required=True, help="JSON-lines file of {prompt, target}")
    p.add_argument("--out", required=True, help="folder for the edited model")
    p.add_argument("--step", default="best", help="editor checkpoint: best, latest or a step number")
    p.add_argument("--mode", choices=("batch", "sequential"), default="batch")
    p.add_argument("--retries", type=int, default=0,
                   help="mend: apply the editor again, at most this many more times, while a request's own prompt does "
                        "not give its target (the combined edit in --mode batch, each request in sequential; default 0)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--num-labels", type=int, default=None)
    p.add_argument(
        "--allow-other-model", action="store_true",
        help="accept a model whose name differs from the one the editor was trained for (e.g. an edited copy); "
        "the edited weights' paths and shapes are still checked",
    )
    p.add_argument("--keep", default=None,
                   help="JSON-lines file of {prompt, target} facts that must not change: scored before and after (drawdown)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help="longest prompt + target in tokens (also capped by the model's context); a longer request is an error")
    p.add_argument("--no-progress", action="store_true")


def _correct(model, params, batch):
    import jax
    import numpy as np

    from salem_jax.losses import example_correct

    logits = jax.jit(model.apply)(params, batch)
    return np.asarray(example_correct(logits, batch["labels"], batch["label_mask"]))


def auto_layer(model, requests: list[dict], keep: list[dict] | None, scorer: str, *, progress: bool = True):
    """The layer a scorer chooses for closed-form edits of `requests`: (layer name, LayerProfile).

    Each request is a `fail` row (prompt -> new target, record id = its 1-based line); `keep` facts
    are `pass` rows. Saliency scorers profile the MLP weights of every layer on those rows; with
    "causal-trace", ROME's causal tracing of the requests' subjects (requests whose subject is not
    in the prompt are left out of the trace). Top-1 of the profile."""
    from salem_jax.locate.choose import LocateConfig, locate  # jax and the model code: not needed for --help

    rows = [{"id": f"req{i + 1}", "record_id": str(i + 1), "group": "fail", "prompt": r["prompt"], "target": r["target"]}
            for i, r in enumerate(requests)]
    rows += [{"id": f"keep{i + 1}", "record_id": f"keep{i + 1}", "group": "pass", "prompt": r["prompt"],
              "target": r["target"]} for i, r in enumerate(keep or [])]
    cfg = LocateConfig(scorer=scorer if scorer != "causal-trace" else "salem", part="mlp", top_k=1)
    if scorer == "causal-trace":
        subjects = {str(i + 1): r.get("subject", "") for i, r in enumerate(requests)}
        profile = locate(model, rows, "causal-trace", cfg, subjects=subjects, progress=progress)
    else:
        profile = locate(model, rows, "lga" if scorer == "lga" else "saliency", cfg, progress=progress)
    return profile.chosen[0], profile


def _edit_with_retries(model, editor, requests, args):
    """(params, applications): `mend.retry.edit_until_reached` on the combined edit (--mode batch: one
    count) or on each request after the previous ones (--mode sequential: one count per request); a count
    is the applications in the edit kept (1 when the retries did not reach more requests)."""
    from tqdm.auto import tqdm

    from salem_jax.mend.apply import apply_edits
    from salem_jax.mend.retry import edit_until_reached

    def edit(params, rows):
        return apply_edits(model, editor, rows, params=params, progress=False)

    if args.mode == "batch":
        params, n, _ = edit_until_reached(model, edit, model.params, list(requests), args.retries)
        return params, [n]
    params, counts = model.params, []
    for r in tqdm(requests, desc="edits", disable=args.no_progress):
        params, n, _ = edit_until_reached(model, edit, params, [r], args.retries)
        counts.append(n)
    return params, counts


def _locate_edit(model, requests, args, keep=None):
    import dataclasses

    from salem_jax.baselines.editors import get_editor, layers_for
    from salem_jax.baselines.keystats import KeyStats
    from salem_jax.baselines.locate_edit import EditorConfig
    from salem_jax.baselines.requests import EditRequest

    if args.layers == "auto":
        layers, profile = auto_layer(model, requests, keep, args.scorer, progress=not args.no_progress)
        print(f"--layers auto ({args.scorer}) chose {layers}")
    else:
        profile = None
        layers = args.layers.split(",") if "," in args.layers else args.layers
    reqs = [EditRequest(r["prompt"], r.get("subject", ""), r["target"], relation=r.get("relation"),
                        record_id=str(i + 1)) for i, r in enumerate(requests)]
    stats = KeyStats(model, model.params, max_tokens=args.cov_tokens, progress=not args.no_progress)
    cfg = dataclasses.replace(EditorConfig(), batch_size=args.batch_size)
    out = get_editor(args.method)(model, model.params, reqs, layers=layers_for(model, args.method, layers, args.band),
                                  stats=stats, config=cfg, progress=not args.no_progress)
    for _, why in out.skipped:
        print(f"skipped: {why}")
    print(json.dumps({"method": args.method, "layers": list(out.layers), "edited": len(out.edited),
                      "skipped": len(out.skipped), "covariance": out.stats["layers"]}))
    return out.params, profile


def run(args) -> int:
    import numpy as np

    from salem_jax import parallel

    parallel.initialize_distributed()

    from salem_jax.mend.apply import (
        apply_edits,
        check_editor_dir,
        check_finite,
        encode_requests,
        load_editor,
        read_requests,
        save_edited,
    )
    from salem_jax.models import check_save_target, load_model

    if args.step in ("best", "latest"):
        step = args.step
    elif args.step.isdigit():
        step = int(args.step)
    else:
        raise ValueError(f"--step {args.step!r}: expected best, latest or a step number")
    if args.method == "mend" and not args.editor:
        raise SystemExit("salem edit: --editor is required with --method mend (or choose --method rrome|memit|emmet|alphaedit)")
    if args.method != "mend" and not args.layers:
        raise SystemExit(f"salem edit: --method {args.method} needs --layers (e.g. layers.7, or auto; `salem locate` suggests one)")
    if args.layers == "auto" and args.scorer == "contrast" and not args.keep:
        raise SystemExit("salem edit: --scorer contrast compares the requests with facts that must not change: give --keep")
    if args.retries < 0:
        raise SystemExit(f"salem edit: --retries {args.retries}: give a number >= 0 (0 = each edit applied once)")
    if args.retries and args.method != "mend":
        raise SystemExit(f"salem edit: --retries is for --method mend (a learned editor); {args.method} optimises each "
                         "request's target itself")
    if args.method == "mend" and args.layers:
        raise SystemExit("salem edit: --layers is for the closed-form methods; a MEND editor edits the layers it was trained on")
    # everything that can be checked without the model, before loading it
    requests = read_requests(args.requests)
    keep = read_requests(args.keep) if args.keep else None
    check_save_target(args.out)
    if args.method == "mend":
        check_editor_dir(args.editor)
    model = load_model(args.model, dtype=args.dtype, num_labels=args.num_labels)
    # lengths (and labels) of every request before any edit is computed
    batch = encode_requests(model, requests, where=args.requests, max_tokens=args.max_tokens)
    kb = encode_requests(model, keep, where=args.keep, max_tokens=args.max_tokens) if keep else None
    if args.method == "mend":
        editor = load_editor(args.editor, model, step=step, check_name=not args.allow_other_model)
        if args.retries:
            params, applications = _edit_with_retries(model, editor, requests, args)
            print(f"editor applications: {applications} (--retries {args.retries}, --mode {args.mode})")
        else:
            params = apply_edits(model, editor, requests, mode=args.mode, progress=not args.no_progress)
        profile = None
    else:
        params, profile = _locate_edit(model, requests, args, keep)
    check_finite(params)  # a diverged edit is reported before any result (save_edited refuses it too)
    before, after = _correct(model, model.params, batch), _correct(model, params, batch)
    # rephrasings: one batch of (rephrase, target) rows, scored on the base and the edited model
    owner = [i for i, r in enumerate(requests) for _ in r.get("rephrases", [])]
    reph_before = reph_after = np.zeros(0, bool)
    if owner:
        rows = [{"prompt": p, "target": r["target"]} for r in requests for p in r.get("rephrases", [])]
        rb = encode_requests(model, rows, where=f"{args.requests} (rephrases)", max_tokens=args.max_tokens)
        reph_before, reph_after = _correct(model, model.params, rb), _correct(model, params, rb)
    owner = np.asarray(owner, int)
    for i, (r, b, a) in enumerate(zip(requests, before, after)):
        line = {"prompt": r["prompt"], "target": r["target"], "correct_before": bool(b), "correct_after": bool(a)}
        if r.get("rephrases"):
            mine = owner == i
            line.update(rephrases=len(r["rephrases"]), rephrases_right_before=int(reph_before[mine].sum()),
                        rephrases_right_after=int(reph_after[mine].sum()))
        print(json.dumps(line))
    out = save_edited(model, params, args.out)
    if profile is not None:  # --layers auto: how the layer was chosen, beside the weights
        (Path(out) / "layer_profile.json").write_text(profile.to_json())
    print(f"{int(after.sum())}/{len(requests)} requests right after editing ({int(before.sum())} before); edited model in {out}")
    if owner.size:
        print(f"{int(reph_after.sum())}/{owner.size} rephrasings right after editing ({int(reph_before.sum())} before)")
    if keep:
        keep_before, keep_after = _correct(model, model.params, kb), _correct(model, params, kb)
        print(f"{int(keep_after.sum())}/{len(keep)} keep facts right after editing ({int(keep_before.sum())} before): "
              f"drawdown {(keep_before.sum() - keep_after.sum()) / len(keep):.3f}")
    return 0
