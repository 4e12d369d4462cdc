"""Fine-tuning: LoRA / QLoRA on grounded answers (SQuAD 2.0) or any chat / Q-A / text JSONL."""

from .config import TrainConfig, make_config
from .loop import train

__all__ = ["TrainConfig", "make_config", "train"]
