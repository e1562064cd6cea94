"""The paper's Table 2: SaLEM on zsRE with BART (BART-large, 406M).

    python -m experiments.zsre_bart --tiny                       # tiny random model, seconds on a CPU
    python -m experiments.zsre_bart [--config.model=PATH] [--config.data=PATH] [--workdir W]
"""

from __future__ import annotations

import sys

from experiments.common import main_for, paper_editor, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "zsre_bart"
    c.model = "facebook/bart-large"
    c.data = "zsre"
    c.format = "zsre"
    c.mode = "counterfactual"
    c.saliency.top_k = 1
    if tiny:
        tiny_overrides(c, "tiny-bart")
    else:
        paper_editor(c)
    return c


def main(argv=None) -> int:
    return main_for("zsre_bart", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
