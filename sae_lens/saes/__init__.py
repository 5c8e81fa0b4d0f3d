"""SAE architectures. Importing this package imports (and so registers) every module in it: adding an
architecture is adding a file."""

import importlib
import pkgutil

from sae_lens.saes.sae import (
    SAEConfig,
    SparseAutoencoder,
    TrainingBatch,
    TrainStepOutput,
    get_architecture_class,
    register_architecture,
    registered_architectures,
)

for _module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_module.name}")

# Explicit imports of the built-in classes, for `from sae_lens.saes import TopKSAE` and type checkers.
from sae_lens.saes.batchtopk_sae import BatchTopKSAE, BatchTopKSAEConfig  # noqa: E402
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig  # noqa: E402
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig  # noqa: E402
from sae_lens.saes.matryoshka_batchtopk_sae import (  # noqa: E402
    MatryoshkaBatchTopKSAE,
    MatryoshkaBatchTopKSAEConfig,
)
from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig  # noqa: E402
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig  # noqa: E402

__all__ = [
    "BatchTopKSAE",
    "BatchTopKSAEConfig",
    "GatedSAE",
    "GatedSAEConfig",
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "MatryoshkaBatchTopKSAE",
    "MatryoshkaBatchTopKSAEConfig",
    "SAEConfig",
    "SparseAutoencoder",
    "StandardSAE",
    "StandardSAEConfig",
    "TopKSAE",
    "TopKSAEConfig",
    "TrainStepOutput",
    "TrainingBatch",
    "get_architecture_class",
    "register_architecture",
    "registered_architectures",
]
