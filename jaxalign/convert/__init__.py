"""Hugging Face safetensors <-> jaxalign parameters, both directions through one weight table."""

from jaxalign.convert.hf_load import load_hf_model, read_config
from jaxalign.convert.hf_save import save_hf_model
from jaxalign.convert.weight_map import WeightEntry, weight_table

__all__ = ["load_hf_model", "read_config", "save_hf_model", "weight_table", "WeightEntry"]
