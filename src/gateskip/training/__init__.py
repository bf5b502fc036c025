"""Fine-tuning the gates: `train(TrainConfig(...))` on accelerate, the losses it combines, the
influence targets, and resumable checkpoints. The text it reads comes from gateskip.data."""

from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
