"""SaLEM on the real zsRE subset with SmolLM2-135M (runs here on a CPU).

zsRE edits are counterfactual (toward alt, as MEND and ROME evaluate them); locality on the loc
questions. Any zsRE file in the MEND/ROME format: --config.data=PATH.

    python -m experiments.zsre_smollm2 --tiny                       # tiny random model, seconds on a CPU
    python -m experiments.zsre_smollm2 [--config.model=PATH] [--config.data=PATH] [--workdir W]
"""

from __future__ import annotations

import sys

from experiments.common import main_for, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "zsre_smollm2"
    c.model = "smollm2-135m"
    c.data = "zsre"
    c.format = "zsre"
    c.mode = "counterfactual"
    c.limit = 400
    c.methods = ('salem', 'mend_fixed')
    # DD on 48 held-out country facts the model knows: what an edit must not break
    c.eval.keep = "countries:capital,region,currency,languages"
    if tiny:
        tiny_overrides(c, "tiny-llama")
    return c


def main(argv=None) -> int:
    return main_for("zsre_smollm2", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
