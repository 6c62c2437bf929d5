"""Layer 4: config, data, DeepSpeed engine, checkpoints, evaluation and the HyPO trainer."""

from hypo_fast.train.config import ConfigError, TrainConfig, config_from_dict, load_config

__all__ = ["ConfigError", "TrainConfig", "config_from_dict", "load_config"]
