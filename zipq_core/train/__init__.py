"""Training a subject or style adapter: the loop (`loop`), resumable checkpoints (`checkpoints`) and QDoRA's
quantized frozen base (`qdora`)."""

from .loop import TrainStep, adapter_from_peft, lora_config, sample_timesteps, train_adapter
from .checkpoints import checkpoint_config, latest_checkpoint

__all__ = ["TrainStep", "adapter_from_peft", "lora_config", "sample_timesteps", "train_adapter",
           "checkpoint_config", "latest_checkpoint"]
