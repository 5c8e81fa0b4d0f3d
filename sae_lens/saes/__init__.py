"""SAE architectures. Importing this package registers every architecture file below."""

from sae_lens.saes import (  # noqa: F401  (registration side effect)
    batchtopk_sae,
    gated_sae,
    jumprelu_sae,
    matryoshka_batchtopk_sae,
    standard_sae,
    topk_sae,
)
from sae_lens.saes.batchtopk_sae import BatchTopKSAE
from sae_lens.saes.gated_sae import GatedSAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKSAE
from sae_lens.saes.sae import (
    SAEConfig,
    SparseAutoencoder,
    TrainStepOutput,
    get_architecture_class,
    register_architecture,
    registered_architectures,
)
from sae_lens.saes.standard_sae import StandardSAE
from sae_lens.saes.topk_sae import TopKSAE

__all__ = [
    "BatchTopKSAE",
    "GatedSAE",
    "JumpReLUSAE",
    "MatryoshkaBatchTopKSAE",
    "SAEConfig",
    "SparseAutoencoder",
    "StandardSAE",
    "TopKSAE",
    "TrainStepOutput",
    "get_architecture_class",
    "register_architecture",
    "registered_architectures",
]
