"""The paper's Table 1 setting on a classifier fine-tuned here: all-MiniLM-L6-v2 on RTE.

The first run fine-tunes minilm-l6 on RTE (`salem_jax.finetune`) into WORKDIR/finetuned, keeping a
fifth of the pairs out for editing; later runs reuse it (or pass a `salem finetune` folder with
--config.finetuned=DIR). The edit set is the paper's: the classifier's own errors on the edit
pairs are the fail rows, its correct answers the pass rows, split 90:10 by pair into editor
train / val edits. Methods: salem, salem3, mend_fixed, ft, ft_kl, ke, enn.

    python -m experiments.nli_minilm --tiny                   # tiny random BERT, seconds on a CPU
    python -m experiments.nli_minilm [--workdir W] [--config.editor.steps=N] [--config.methods=salem,mend_fixed]
"""

from __future__ import annotations

import sys

from experiments.classifier import classifier_config, main_for


def get_config(tiny: bool = False):
    c = classifier_config("nli_minilm", "rte", "correction", tiny)
    if not tiny:
        # The CPU budget (README, "Classifiers"): one epoch at 128 tokens (12% of RTE's pairs are longer
        # and truncated); edits only on pairs of at most 64 tokens (329 of the 497 edit pairs), because every edit
        # re-scores the pass rows at their longest row's length bucket and the MEND step grows with it;
        # half of FEVER's editor steps and evaluation edits.
        c.finetune.update(dict(epochs=1, max_length=128))
        c.edit_max_tokens = 64
        c.editor.update(dict(steps=50, val_every=25, checkpoint_every=25))
        c.ke.steps = 50
        c.enn.steps = 25
        c.eval.update(dict(max_edits=32, max_pass=16))
        c.train_edits = 8
    return c


def main(argv=None) -> int:
    return main_for("nli_minilm", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
