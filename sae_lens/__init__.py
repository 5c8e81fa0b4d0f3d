"""sae_lens: train and analyse sparse autoencoders on language-model activations.

from sae_lens import LanguageModelSAERunnerConfig, language_model_sae_runner, SparseAutoencoder
"""

from sae_lens.activations_store import ActivationsStore
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.evals import explained_variance, model_metrics, reconstruction_metrics
from sae_lens.models import load_model
from sae_lens.runner import language_model_sae_runner, train_sae
from sae_lens.saes import (
    SAEConfig,
    SparseAutoencoder,
    StandardSAE,
    TopKSAE,
    TrainStepOutput,
    register_architecture,
    registered_architectures,
)
from sae_lens.training import SAETrainer

SAE = SparseAutoencoder
"""Short alias of `SparseAutoencoder`."""

__version__ = "0.1.0"

__all__ = [
    "SAE",
    "ActivationsStore",
    "LanguageModelSAERunnerConfig",
    "SAEConfig",
    "SAELensError",
    "SAETrainer",
    "SparseAutoencoder",
    "StandardSAE",
    "TopKSAE",
    "TrainStepOutput",
    "explained_variance",
    "language_model_sae_runner",
    "load_model",
    "model_metrics",
    "reconstruction_metrics",
    "register_architecture",
    "registered_architectures",
    "train_sae",
]
