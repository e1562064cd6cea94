"""The paper's Table 3 on a classifier fine-tuned here: all-MiniLM-L6-v2 on FEVER claims.

The first run fine-tunes minilm-l6 on FEVER's SUPPORTS / REFUTES claims (`salem_jax.finetune`;
NOT ENOUGH INFO left out and counted) into WORKDIR/finetuned, keeping a fifth of the claims out
for editing; later runs reuse it (or pass a `salem finetune` folder with --config.finetuned=DIR).
The edit set is the paper's (appendix A): every edit claim's label is flipped with probability
0.5 (flipped = fail row, kept = pass row), split 90:10 by claim into editor train / val edits.
Methods: salem, salem3, mend_fixed (the last 3 of the 6 layers), ft, ft_kl, ke, enn.

    python -m experiments.fever_minilm --tiny                 # tiny random BERT, seconds on a CPU
    python -m experiments.fever_minilm [--workdir W] [--config.editor.steps=N] [--config.methods=salem,mend_fixed]
"""

from __future__ import annotations

import sys

from experiments.classifier import classifier_config, main_for


def get_config(tiny: bool = False):
    c = classifier_config("fever_minilm", "fever", "counterfactual", tiny)
    if tiny:
        c.limit = 200  # the val split needs flipped and unflipped claims
    return c


def main(argv=None) -> int:
    return main_for("fever_minilm", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
