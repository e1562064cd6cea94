"""The README's main job: correct SmolLM2-135M's real errors on country capitals with SaLEM.

    python -m experiments.capitals_smollm2                     # the real run (under 15 min on 2 CPU cores)
    python -m experiments.capitals_smollm2 --tiny              # tiny random model, seconds
    python -m experiments.capitals_smollm2 --config.methods=salem,mend_fixed,ft,ft_kl

Builds the edit set from the countryinfo package's capitals (fail = capitals the model gets
wrong, adapt = other phrasings, pass = capitals it knows), picks the salient layer, trains a
MEND editor on it, applies each held-out edit and prints the before/after table.
"""

from __future__ import annotations

import sys

from experiments.common import main_for, tiny_overrides
from salem_jax.pipeline import default_config


def get_config(tiny: bool = False):
    c = default_config()
    c.name = "capitals_smollm2"
    c.model = "smollm2-135m"
    c.format = c.data = "countries"
    c.relation = "capital"
    # the 15-minute budget: profile 32 fail and 32 pass rows (fail decides; pass gives the
    # contrast scorer its reference), not every group
    c.saliency.groups = ("fail", "pass")
    c.saliency.max_examples = 32
    # DD on 48 held-out facts the model knows (the val split has only ~6 pass rows): the other
    # country relations, never seen by the editor
    c.eval.keep = "countries:region,currency,languages"
    if tiny:
        tiny_overrides(c, "tiny-llama")
        c.mode = "counterfactual"  # a random model knows no capital: edit toward the true ones anyway
    return c


def main(argv=None) -> int:
    return main_for("capitals_smollm2", get_config, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
