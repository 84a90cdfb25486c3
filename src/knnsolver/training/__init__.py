"""Training: configuration, the trainer, atomic checkpoints and plots."""
from knnsolver.training.config import TrainConfig, load_config_file
from knnsolver.training.run import build_run
from knnsolver.training.saved import embed_saved, evaluate_saved
from knnsolver.training.trainer import train

__all__ = ["TrainConfig", "load_config_file", "build_run", "embed_saved", "evaluate_saved", "train"]
