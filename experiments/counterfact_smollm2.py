"""SaLEM on the real CounterFact subset with SmolLM2-135M (runs here on a CPU).

Any CounterFact file in the ROME format: --config.data=PATH.

    python -m experiments.counterfact_smollm2 --tiny                       # tiny random model, seconds on a CPU
    python -m experiments.counterfact_smollm2 [--config.model=PATH] [--config.data=PATH] [--workdir W]
"""

from __future__ import annotations

import sys

from experiments.common import main_for, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "counterfact_smollm2"
    c.model = "smollm2-135m"
    c.data = "counterfact"
    c.format = "counterfact"
    c.mode = "counterfactual"
    c.limit = 300
    c.methods = ('salem', 'mend_fixed')
    # DD on 48 held-out country facts the model knows: what an edit must not break
    c.eval.keep = "countries:capital,region,currency,languages"
    if tiny:
        tiny_overrides(c, "tiny-llama")
    return c


def main(argv=None) -> int:
    return main_for("counterfact_smollm2", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
