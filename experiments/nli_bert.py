"""The paper's Table 1 setting: SaLEM on natural language inference with a BERT classifier.

RTE ships here (MultiNLI where a user has it: --config.data=PATH). The edits are the classifier's
real errors. Pass a fine-tuned NLI classifier with --config.model=PATH.

    python -m experiments.nli_bert --tiny                       # tiny random model, seconds on a CPU
    python -m experiments.nli_bert [--config.model=PATH] [--config.data=PATH] [--workdir W]
"""

from __future__ import annotations

import sys

from experiments.common import main_for, paper_editor, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "nli_bert"
    c.model = "bert-base-uncased"
    c.data = "rte"
    c.format = "nli"
    c.mode = "correction"
    c.eval.text = ''
    if tiny:
        tiny_overrides(c, "tiny-bert")
    else:
        paper_editor(c)
    return c


def main(argv=None) -> int:
    return main_for("nli_bert", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
