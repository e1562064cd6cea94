"""Choosing the layer to edit: SaLEM saliency (`salem_jax.saliency`), and the costly methods it
replaces - causal tracing (`causal_trace`) and the brute-force fine-tuning sweep (`sweep`) - plus
rank statistics comparing them (`rank`) and bar charts (`plot`)."""

METHODS = ("saliency", "lga", "causal-trace", "sweep")  # salem_jax.locate.choose.locate
