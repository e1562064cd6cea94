"""Choosing the layer to edit: SaLEM saliency (`salem_jax.saliency`), and the costly methods it
replaces - causal tracing (`causal_trace`) and the brute-force fine-tuning sweep (`sweep`) - plus
rank statistics comparing them (`rank`) and bar charts (`plot`); the editability probe
(`editability`, a layer score that predicts where a MEND editor can edit) and its oracle, MEND
trained on each candidate layer set (`mend_sweep`)."""

METHODS = ("saliency", "lga", "causal-trace", "sweep", "editability", "mend-sweep")  # salem_jax.locate.choose.locate
