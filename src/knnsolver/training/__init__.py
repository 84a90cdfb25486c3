"""Training: configuration, the trainer, atomic checkpoints and plots."""
from knnsolver.training.config import TrainConfig, load_config_file
from knnsolver.training.trainer import build_run, embed_saved, evaluate_saved, train

__all__ = ["TrainConfig", "load_config_file", "build_run", "embed_saved", "evaluate_saved", "train"]
