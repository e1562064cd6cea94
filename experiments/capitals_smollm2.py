"""The README's main job: correct SmolLM2-135M's real errors on country capitals with SaLEM.

    python -m experiments.capitals_smollm2                     # the real run (under 15 min on 2 CPU cores)
    python -m experiments.capitals_smollm2 --tiny              # tiny random model, seconds
    python -m experiments.capitals_smollm2 --config.methods=salem,mend_fixed,ft,ft_kl

Builds the edit set from the countryinfo package's capitals (fail = capitals the model gets
wrong, adapt = other phrasings, pass = capitals it knows), picks the salient layer, trains a
MEND editor on it, applies each held-out edit and prints the before/after table.
"""

from __future__ import annotations

import sys

from experiments.common import parse
from salem_jax.pipeline import default_config, run_pipeline


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "capitals_smollm2"
    if tiny:
        c.model = "tiny-llama"
        c.mode = "counterfactual"  # a random model knows no capital: edit toward the true ones anyway
        c.limit = 40
        c.saliency.max_examples = 8
        c.editor.update(dict(steps=30, rank=16, lr=1e-3, lr_lr=1e-3, edit_lr_init=1e-3, effective_batch=1,
                             val_every=15, checkpoint_every=15, val_groups=8))
        c.eval.update(dict(max_edits=3, max_pass=8, ppl_edits=1, n_texts=2, text_window=32))
        c.ft.steps = 3
    return c


def main(argv=None) -> int:
    cfg, workdir = parse(get_config, argv, "capitals_smollm2")
    run_pipeline(cfg, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
