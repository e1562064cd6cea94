"""Models: the LoadedModel interface (base), our Flax GPT-2/GPT-Neo/T5/BART/BERT (hf), our Flax Llama
(llama, gguf), and `load_model` / `save_model` (loading)."""

from salem_jax.models.base import Block, LayerTable, LoadedModel, Weight
from salem_jax.models.loading import HubUnavailableError, check_save_target, load_model, save_model

__all__ = ["Block", "HubUnavailableError", "LayerTable", "LoadedModel", "Weight", "check_save_target", "load_model", "save_model"]
