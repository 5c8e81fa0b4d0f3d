"""Training: the loop (`SAETrainer`), its config, one SAE's training state, and the LR schedules."""

from sae_lens.training.config import TrainerConfig
from sae_lens.training.state import TrainingState
from sae_lens.training.trainer import SAETrainer

__all__ = ["SAETrainer", "TrainerConfig", "TrainingState"]
