"""The paper's Table 2: SaLEM on WikiText generation with GPT-Neo 2.7B (drawdown = perplexity increase).

Each record is a WikiText paragraph: the first words are the prompt, the next words the target.

    python -m experiments.wikitext_gptneo --tiny                       # tiny random model, seconds on a CPU
    python -m experiments.wikitext_gptneo [--config.model=PATH] [--config.data=PATH] [--workdir W]
"""

from __future__ import annotations

import sys

from experiments.common import main_for, paper_editor, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "wikitext_gptneo"
    c.model = "EleutherAI/gpt-neo-2.7B"
    c.data = "wikitext"
    c.format = "text"
    c.mode = "counterfactual"  # see pipeline.text_edits
    c.eval.text = 'wikitext'
    if tiny:
        tiny_overrides(c, "tiny-gpt_neo")
    else:
        paper_editor(c)
    return c


def main(argv=None) -> int:
    return main_for("wikitext_gptneo", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
