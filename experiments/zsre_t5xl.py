"""The paper's Table 2: SaLEM on zsRE with T5-XL (3B; MEND's T5-XL is the NQ-fine-tuned t5-xl-ssm-nq).

Needs an accelerator (or a pod: launch the same command on every host). The checkpoint comes from
the hub cache or a local folder (--config.model=/path/to/t5-xl-ssm-nq).

    python -m experiments.zsre_t5xl --tiny                       # tiny random model, seconds on a CPU
    python -m experiments.zsre_t5xl [--config.model=PATH] [--config.data=PATH] [--workdir W]
"""

from __future__ import annotations

import sys

from experiments.common import main_for, paper_editor, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "zsre_t5xl"
    c.model = "google/t5-xl-ssm-nq"
    c.data = "zsre"
    c.format = "zsre"
    c.mode = "counterfactual"
    c.saliency.top_k = 1
    if tiny:
        tiny_overrides(c, "tiny-t5")
    else:
        paper_editor(c)
    return c


def main(argv=None) -> int:
    return main_for("zsre_t5xl", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
