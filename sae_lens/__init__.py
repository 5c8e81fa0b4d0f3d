"""sae_lens: train and analyse sparse autoencoders on language-model activations.

from sae_lens import LanguageModelSAERunnerConfig, language_model_sae_runner, SparseAutoencoder
"""

from sae_lens.activations_store import ActivationsStore
from sae_lens.cached_activations import (
    CacheActivationsRunnerConfig,
    CachedActivationsStore,
    cache_activations_runner,
)
from sae_lens.config import LanguageModelSAERunnerConfig
from sae_lens.errors import SAELensError
from sae_lens.eval_runner import EvalConfig, EvalResult, run_evals
from sae_lens.evals import explained_variance, model_metrics, reconstruction_metrics
from sae_lens.hooked_sae_transformer import HookedSAETransformer
from sae_lens.hub import pretrained_saes_table
from sae_lens.models import load_model
from sae_lens.pretrained import (
    LMSparseAutoencoderSessionloader,
    SAEGroup,
    load_model_and_sae,
    load_sae,
    load_sae_group,
)
from sae_lens.runner import language_model_sae_runner, train_sae
from sae_lens.saes import (
    BatchTopKSAE,
    BatchTopKSAEConfig,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKSAEConfig,
    SAEConfig,
    SparseAutoencoder,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    TrainStepOutput,
    register_architecture,
    registered_architectures,
)
from sae_lens.training import SAETrainer, TrainerConfig, TrainingState
from sae_lens.version import __version__

SAE = SparseAutoencoder
"""Short alias of `SparseAutoencoder`."""


__all__ = [
    "SAE",
    "ActivationsStore",
    "BatchTopKSAE",
    "BatchTopKSAEConfig",
    "CacheActivationsRunnerConfig",
    "CachedActivationsStore",
    "EvalConfig",
    "EvalResult",
    "GatedSAE",
    "GatedSAEConfig",
    "HookedSAETransformer",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "LMSparseAutoencoderSessionloader",
    "LanguageModelSAERunnerConfig",
    "MatryoshkaBatchTopKSAE",
    "MatryoshkaBatchTopKSAEConfig",
    "SAEConfig",
    "SAEGroup",
    "SAELensError",
    "SAETrainer",
    "SparseAutoencoder",
    "StandardSAE",
    "StandardSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "TrainStepOutput",
    "TrainerConfig",
    "TrainingState",
    "__version__",
    "cache_activations_runner",
    "explained_variance",
    "language_model_sae_runner",
    "load_model",
    "load_model_and_sae",
    "load_sae",
    "load_sae_group",
    "model_metrics",
    "pretrained_saes_table",
    "reconstruction_metrics",
    "register_architecture",
    "registered_architectures",
    "run_evals",
    "train_sae",
]
