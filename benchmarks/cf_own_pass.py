"""Benchmark (issue 13, session 16): own-record locality rows on CounterFact, one pipeline run.

    PYTHONPATH=. python benchmarks/cf_own_pass.py --layer layers.27 --workdir runs/cf16 \\
        --config.methods=salem_edit_own,salem_edit_base --config.editor.own_pass_per_group=4 [other --config.* flags]
    PYTHONPATH=. python benchmarks/cf_own_pass.py --layer layers.1 --tiny --config.methods=salem_edit_own,salem_edit_base \\
        --config.editor.pass_per_group=3 --config.editor.own_pass_per_group=2     # tiny random model, a smoke run
    PYTHONPATH=. python benchmarks/cf_own_pass.py --layer layers.27 --editor-seed 1 ...   # another editor seed, same edit set

`experiments.counterfact_smollm2` with two extra methods, both the MEND editor of `prepare_mend` on
the one layer `--layer` (on SmolLM2 layers.27: `salem_edit`'s layer, editability's choice on this
CounterFact edit set in sessions 10-12; given here so the 12-minute editability probe is not rerun):

- salem_edit_own:  config.editor.own_pass_per_group as given (pass rows from the edit's own record);
- salem_edit_base: the same run config with own_pass_per_group = 0 (every pass row from the pool).

Each method records its own_pass_per_group in results.json (training.NAME.own_pass_per_group); the
run's config.editor.own_pass_per_group is the _own method's.

--editor-seed N (session 17): both editors train with TrainConfig seed N (the editor's initialisation
and its training groups' sampling) while the edit set, its train/val split and the evaluation keep
config.seed. `--config.seed=N` would instead rebuild the edit set with a new split (the seed is one of
the pipeline's EDIT_SET_KEYS): a different set of val edits, and 10 minutes more on this CPU. The
seed used is recorded as training.NAME.editor_seed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments import counterfact_smollm2  # noqa: E402
from salem_jax.methods import Method, register  # noqa: E402
from salem_jax.methods.mend import ALL_KINDS, prepare_mend  # noqa: E402


def _prepare(name: str, own: int | None, layer: str, editor_seed: int | None = None):
    """The method's prepare(ctx, layers): `prepare_mend` with a copy of ctx.cfg whose
    editor.own_pass_per_group is `own` (None: as configured) and whose seed is `editor_seed`
    (None: config.seed). Only the editor's training sees the copy; ctx.cfg is not changed."""

    def prepare(ctx, layers):
        cfg = ctx.cfg
        if own is not None or editor_seed is not None:
            cfg = copy.deepcopy(ctx.cfg)
            if own is not None:
                cfg.editor.own_pass_per_group = own
            if editor_seed is not None:
                cfg.seed = editor_seed
            ctx = dataclasses.replace(ctx, cfg=cfg)
        p = prepare_mend(ctx, layers, name)
        p.info["own_pass_per_group"] = int(cfg.editor.own_pass_per_group)
        p.info["editor_seed"] = int(cfg.seed)
        p.info["layer_score"] = f"given: {layer} (--layer)"
        return p

    return prepare


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--layer", required=True, help="the one layer both editors edit (e.g. layers.27)")
    ap.add_argument("--editor-seed", type=int, default=None,
                    help="the editors' training seed (default: config.seed); the edit set and its split keep config.seed")
    args, rest = ap.parse_known_args(argv)
    if args.editor_seed is not None and args.editor_seed < 0:
        raise SystemExit(f"cf_own_pass.py: --editor-seed must be >= 0, got {args.editor_seed}")
    layers = (args.layer,)
    register(Method(name="salem_edit_own", summary=f"MEND on {args.layer}, own-record pass rows", supports=ALL_KINDS,
                    layers=lambda ctx: layers, prepare=_prepare("salem_edit_own", None, args.layer, args.editor_seed)), replace=True)
    register(Method(name="salem_edit_base", summary=f"MEND on {args.layer}, pass rows from the pool",
                    supports=ALL_KINDS, layers=lambda ctx: layers, prepare=_prepare("salem_edit_base", 0, args.layer, args.editor_seed)),
             replace=True)
    return counterfact_smollm2.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
