"""The paper's Table 2: SaLEM on WikiText generation with DistilGPT-2 (drawdown = perplexity increase).

    python -m experiments.wikitext_distilgpt2 --tiny                       # tiny random model, seconds on a CPU
    python -m experiments.wikitext_distilgpt2 [--config.model=PATH] [--config.data=PATH] [--workdir W]
"""

from __future__ import annotations

import sys

from experiments.common import main_for, paper_editor, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "wikitext_distilgpt2"
    c.model = "distilgpt2"
    c.data = "wikitext"
    c.format = "text"
    c.mode = "counterfactual"  # see pipeline.text_edits
    c.eval.text = 'wikitext'
    if tiny:
        tiny_overrides(c, "tiny-gpt2")
    else:
        paper_editor(c)
    return c


def main(argv=None) -> int:
    return main_for("wikitext_distilgpt2", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
