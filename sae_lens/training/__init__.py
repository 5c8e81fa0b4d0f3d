"""Training: the loop (`SAETrainer`) and its learning-rate schedules."""

from sae_lens.training.trainer import SAETrainer

__all__ = ["SAETrainer"]
