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
    c.finetune.epochs = 1 if tiny else 3
    c.finetune.max_length = 128 if tiny else 160
    return c


def main(argv=None) -> int:
    return main_for("nli_minilm", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
