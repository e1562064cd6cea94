"""The paper's Table 4: SaLEM on CounterFact with GPT-2 XL (edits toward target_new; locality on
neighborhood prompts).

    python -m experiments.counterfact_gpt2xl --tiny                       # tiny random model, seconds on a CPU
    python -m experiments.counterfact_gpt2xl [--config.model=PATH] [--config.data=PATH] [--workdir W]
"""

from __future__ import annotations

import sys

from experiments.common import main_for, paper_editor, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "counterfact_gpt2xl"
    c.model = "gpt2-xl"
    c.data = "counterfact"
    c.format = "counterfact"
    c.mode = "counterfactual"
    c.methods = ('salem', 'mend_fixed')
    if tiny:
        tiny_overrides(c, "tiny-gpt2")
    else:
        paper_editor(c)
    return c


def main(argv=None) -> int:
    return main_for("counterfact_gpt2xl", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
