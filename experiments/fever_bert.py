"""The paper's Table 3: SaLEM on FEVER fact checking with a BERT classifier.

As in the paper (appendix A), FEVER edits flip labels drawn by Bernoulli(0.5) (the counterfactual
mode of classification edit sets). Pass a fine-tuned FEVER classifier with --config.model=PATH.

    python -m experiments.fever_bert --tiny                       # tiny random model, seconds on a CPU
    python -m experiments.fever_bert [--config.model=PATH] [--config.data=PATH] [--workdir W]
"""

from __future__ import annotations

import sys

from experiments.common import main_for, paper_editor, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "fever_bert"
    c.model = "bert-base-uncased"
    c.data = "fever"
    c.format = "fever"
    c.mode = "counterfactual"
    c.eval.text = ''
    if tiny:
        tiny_overrides(c, "tiny-bert")
        c.limit = 120  # enough records that the val split has unflipped (pass) ones
    else:
        paper_editor(c)
    return c


def main(argv=None) -> int:
    return main_for("fever_bert", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
