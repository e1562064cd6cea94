"""Models: the LoadedModel interface (base), transformers' Flax classes (hf), our Flax Llama
(llama, gguf), and `load_model` / `save_model` (loading)."""

from salem_jax.models.base import Block, LayerTable, LoadedModel, Weight
from salem_jax.models.loading import HubUnavailableError, check_save_target, load_model, save_model

__all__ = ["Block", "HubUnavailableError", "LayerTable", "LoadedModel", "Weight", "check_save_target", "load_model", "save_model"]
