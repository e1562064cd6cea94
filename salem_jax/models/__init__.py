"""Models: the LoadedModel interface (base), transformers' Flax classes (hf), our Flax Llama
(llama, gguf), and `load_model` / `save_model` (loading)."""

from salem_jax.models.base import Block, LayerTable, LoadedModel, Weight
from salem_jax.models.loading import HubUnavailableError, load_model, save_model

__all__ = ["Block", "HubUnavailableError", "LayerTable", "LoadedModel", "Weight", "load_model", "save_model"]
