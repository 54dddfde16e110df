"""Model folders in and out: Hugging Face safetensors <-> jaxalign parameters through one weight table,
reward models in both layouts, and jaxalign checkpoints."""

from jaxalign.convert.checkpoint_io import load_any_model, load_checkpoint_model
from jaxalign.convert.hf_load import load_hf_model, read_config
from jaxalign.convert.hf_save import save_hf_model
from jaxalign.convert.seq_cls import load_seq_cls_reward_model, save_seq_cls_model
from jaxalign.convert.reward_model import load_reward_model, reward_model_layout, save_reward_model_folder
from jaxalign.convert.value_head_io import save_reward_model
from jaxalign.convert.weight_map import WeightEntry, weight_table

__all__ = [
    "load_any_model", "load_checkpoint_model", "load_hf_model", "read_config", "save_hf_model",
    "load_seq_cls_reward_model", "save_seq_cls_model", "load_reward_model", "save_reward_model",
    "reward_model_layout", "save_reward_model_folder",
    "weight_table", "WeightEntry",
]
