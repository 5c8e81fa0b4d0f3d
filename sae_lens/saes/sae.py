"""The SAE base class and its config: parameters, hooks, encode/decode, and the one training step.

An architecture is a file in this package holding a config dataclass (its own options, declared once
with their defaults, docstrings and checks) and a `SparseAutoencoder` subclass registered with
`@register_architecture("name")`. The base class runs the training step; an architecture contributes
only what is its own:

- `encode_for_training(x) -> TrainingBatch` and `decode_for_training(batch)` (dense by default; the
  TopK family plugs in its sparse kernels), and
- `auxiliary_losses(batch)`, its extra loss terms by name (`{"l1": ...}`, `{"aux_k": ...}`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from sae_lens.config_fields import (
    field_default,
    non_negative,
    one_of,
    option,
    optional,
    positive,
    positive_int,
    validate_fields,
)
from sae_lens.dtypes import DTYPES, dtype_name, torch_dtype
from sae_lens.errors import SAELensError
from sae_lens.kernels import Backend
from sae_lens.sae_files import SAEFiles, read_sae_folder, write_sae_folder

# -- the architecture registry ----------------------------------------------------------------------

_REGISTRY: dict[str, type[SparseAutoencoder]] = {}
T = TypeVar("T", bound="type[SparseAutoencoder]")


def register_architecture(name: str):
    """Class decorator: make an SAE subclass (and its `config_class`) buildable under `name`."""

    def decorate(cls: T) -> T:
        cls.architecture_name = name
        cls.config_class.architecture = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_architectures() -> list[str]:
    """Names accepted as `architecture`, sorted."""
    return sorted(_REGISTRY)


def get_architecture_class(name: str) -> type[SparseAutoencoder]:
    """The SAE class registered under `name`, or a SAELensError listing the known names."""
    if name not in _REGISTRY:
        raise SAELensError(
            f"unknown SAE architecture {name!r}; known architectures: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[name]


# -- config -------------------------------------------------------------------------------------------


def _known_dtype(name: str, value: Any) -> None:
    one_of(*DTYPES)(name, value)


@dataclass
class SAEConfig:
    """What every SAE needs to run, saved as its `cfg.json` in SAELens 6.x's layout.

    Each architecture subclasses it with its own options; `SAEConfig.from_dict` builds the right
    subclass from a saved config.
    """

    architecture: ClassVar[str] = ""
    """Set by `register_architecture` on each architecture's config class."""

    d_in: int
    """Width of the activations it reads."""
    d_sae: int
    """Number of latents."""
    d_out: int | None = option(None, optional(positive_int))
    """Width of the output when it is not the input's (a transcoder writing another hook); d_in when unset."""
    dtype: str = option("float32", _known_dtype)
    """Parameter dtype."""
    device: str = "cpu"
    """Parameter device."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding."""
    decoder_init_norm: float | None = option(None, optional(positive))
    """Norm of the decoder rows at initialisation; unit norm when unset."""
    skip_connection: bool = False
    """Add a learned linear skip path `x @ W_skip` (`[d_in, d_out]`) to the output, as skip transcoders do."""
    metadata: dict[str, Any] = option(default_factory=dict)
    """Where the SAE belongs: model_name, hook_name, hook_layer, hook_head_index, context_size, ..."""

    def __post_init__(self) -> None:
        self.dtype = dtype_name(torch_dtype(self.dtype))
        self.validate()

    def validate(self) -> None:
        """Check every field; architectures extend this with checks that involve several fields."""
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise SAELensError(
                    f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}"
                )
        validate_fields(self)
        if self.apply_b_dec_to_input and self.output_width != self.d_in:
            raise SAELensError(
                f"apply_b_dec_to_input needs d_out == d_in (b_dec is added to the output); got d_in={self.d_in}, "
                f"d_out={self.d_out}: set apply_b_dec_to_input to false"
            )

    @property
    def output_width(self) -> int:
        """d_out, or d_in when unset."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def is_transcoder(self) -> bool:
        """Whether the SAE writes another hook than it reads (`metadata["hook_name_out"]`)."""
        return bool(self.metadata.get("hook_name_out")) and self.metadata.get(
            "hook_name_out"
        ) != self.metadata.get("hook_name")

    @classmethod
    def option_names(cls) -> list[str]:
        """The options a training config may set: every field but the shape, dtype, device and metadata."""
        return [f.name for f in dataclasses.fields(cls) if f.name not in _NOT_OPTIONS]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict in SAELens 6.x's layout (`hook_name` etc. inside `metadata`)."""
        # normalize_activations is what SAELens reads; our saved SAEs always take raw activations.
        return {
            "architecture": self.architecture,
            **dataclasses.asdict(self),
            "normalize_activations": "none",
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SAEConfig:
        """The config of the architecture `values["architecture"]` names, from a saved config.

        Keys the architecture does not declare (other libraries' fields, training-only settings of
        older files) are ignored.
        """
        name = values.get("architecture") or cls.architecture
        config_class = get_architecture_class(name).config_class
        known = {f.name for f in dataclasses.fields(config_class)}
        return config_class(**{key: value for key, value in values.items() if key in known})

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """This architecture's options with their default values."""
        return {f.name: field_default(f) for f in dataclasses.fields(cls) if f.name in cls.option_names()}


_NOT_OPTIONS = {"d_in", "d_sae", "d_out", "dtype", "device", "metadata"}


@dataclass
class L1PenaltyConfig(SAEConfig):
    """The options of an architecture trained with a (decoder-norm-weighted) Lp penalty."""

    l1_coefficient: float = option(1e-3, non_negative)
    """Weight of the sparsity penalty."""
    lp_norm: float = option(1.0, positive)
    """p of the sparsity penalty's norm (1 is L1)."""


# -- training-step output ---------------------------------------------------------------------------

SPARSITY_LOSSES = ("l1", "l0")
"""Loss names summed into the seed-era `l1_loss`."""
DEAD_LATENT_LOSSES = ("ghost_grad", "aux_k", "gated_aux")
"""Loss names summed into the seed-era `ghost_grad_loss`."""


class TrainStepOutput:
    """What one training forward pass returns.

    `losses` maps each term's name to its (weighted) value; `loss`, their sum, is what the
    optimiser minimises. For the seed era it also unpacks as the 6-tuple
    `(sae_out, feature_acts, loss, mse_loss, l1_loss, ghost_grad_loss)`.
    """

    def __init__(
        self,
        sae_out: torch.Tensor,
        feature_acts: torch.Tensor,
        loss: torch.Tensor,
        losses: dict[str, torch.Tensor],
    ) -> None:
        self.sae_out = sae_out
        """Reconstruction `[batch, d_in]`."""
        self.feature_acts = feature_acts
        """Latent activations `[batch, d_sae]`, detached; a sparse COO tensor for the TopK family."""
        self.loss = loss
        """The scalar the optimiser minimises: the sum of `losses`."""
        self.losses = losses
        """Each loss term by name: `mse` (squared error summed over d_in, mean over tokens) and the
        architecture's own (`l1`, `ghost_grad`, `aux_k`, `l0`, `gated_aux`, `matryoshka_prefix_i`)."""

    def _sum(self, names: tuple[str, ...]) -> torch.Tensor:
        terms = [value for name, value in self.losses.items() if name in names]
        return torch.stack(terms).sum() if terms else torch.zeros_like(self.loss)

    @property
    def mse_loss(self) -> torch.Tensor:
        """The reconstruction term (`losses["mse"]`)."""
        return self.losses["mse"]

    @property
    def l1_loss(self) -> torch.Tensor:
        """The weighted sparsity penalty (L1, or JumpReLU's L0); 0 when the architecture has none."""
        return self._sum(SPARSITY_LOSSES)

    @property
    def ghost_grad_loss(self) -> torch.Tensor:
        """The weighted dead-latent / auxiliary loss (ghost grads, AuxK, Gated's); 0 when unused."""
        return self._sum(DEAD_LATENT_LOSSES)

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        """The seed-era 6-tuple."""
        return (self.sae_out, self.feature_acts, self.loss, self.mse_loss, self.l1_loss, self.ghost_grad_loss)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.as_tuple())

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.as_tuple()[index]

    def __len__(self) -> int:
        return 6


@dataclass
class TrainingBatch:
    """One training batch on its way through the step: the architecture's encoder creates it, the
    base class adds the target, the reconstruction and the step's settings, and the architecture's
    `auxiliary_losses` reads it."""

    x: torch.Tensor
    """The input `[batch, d_in]`."""
    feature_acts: torch.Tensor
    """`[batch, d_sae]`: dense and differentiable, or (TopK family) a detached sparse COO tensor."""
    hidden_pre: torch.Tensor | None = None
    """Pre-activations, when the architecture's losses need them."""
    parts: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Architecture-specific intermediates (sparse latents, gate pre-activations, column sums)."""
    target: torch.Tensor | None = None
    """What the output should be, `[batch, d_out]`: the input itself, or a transcoder's target."""
    sae_out: torch.Tensor | None = None
    """The reconstruction `[batch, d_out]`."""
    dead_neuron_mask: torch.Tensor | None = None
    """`[d_sae]` bool: latents that have not fired recently."""
    l1_coefficient: float = 0.0
    """The sparsity coefficient of this step (after warm-up)."""

    @property
    def output(self) -> torch.Tensor:
        """The reconstruction (set before `auxiliary_losses` runs)."""
        assert self.sae_out is not None
        return self.sae_out

    @property
    def goal(self) -> torch.Tensor:
        """The target (set before decoding)."""
        return self.x if self.target is None else self.target


# -- the SAE ----------------------------------------------------------------------------------------


class SparseAutoencoder(HookedRootModule):
    """A sparse autoencoder `x -> f = act((x - b_dec) @ W_enc + b_enc) -> f @ W_dec + b_dec`.

    `SparseAutoencoder(cfg)` builds the architecture that `cfg` names: an architecture's config
    (`TopKSAEConfig(d_in=..., d_sae=..., k=...)`), or a `LanguageModelSAERunnerConfig` with `d_in`.

    Parameters: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]` (unit-norm rows while
    training), `b_dec [d_in]`. Hook points: `hook_sae_in`, `hook_hidden_pre`, `hook_hidden_post`,
    `hook_sae_out`.
    """

    architecture_name: ClassVar[str] = ""
    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    """The architecture's config dataclass."""
    normalize_decoder: ClassVar[bool] = True
    """Whether training keeps decoder rows at unit norm (and drops the gradient along them)."""
    decoder_lr_scale: ClassVar[float] = 1.0
    """The multiple of the learning rate that `W_dec` trains at by default
    (`TrainerConfig.decoder_lr_scale` overrides it). See `TopKSAE.decoder_lr_scale` for why the
    TopK family raises it."""
    supports_decoder_refit: ClassVar[bool] = False
    """Whether the trainer may refit `W_dec` and `b_dec` by least squares at the end of training
    (`sae_lens.training.decoder_refit`): only where the training codes are sparse and the loss is
    plain reconstruction."""
    reuse_freed_cpu_memory: ClassVar[bool] = False
    """Whether CPU training keeps freed memory for reuse by default (`sae_lens.cpu_memory`).

    Off for architectures whose step allocates many dense `[batch, d_sae]` temporaries (jumprelu,
    gated): kept freed memory fragments around them and doubles peak memory for a ~1.8x faster
    step. `TrainerConfig.cpu_reuse_freed_memory` overrides it."""
    kernel_backend: Backend = "auto"
    """Which sparse-product kernels the TopK family's training uses (`sae_lens.kernels.Backend`:
    "auto", "csr" or "index"); set it on an instance to pin one, e.g. in tests."""
    cfg: SAEConfig

    def __new__(cls, cfg: Any, *args: Any, **kwargs: Any):
        if cls is SparseAutoencoder:
            cls = get_architecture_class(_architecture_of(cfg))
        return super().__new__(cls)

    def __init__(self, cfg: Any) -> None:
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            cfg = cfg.sae_config()  # a training config whose d_in is known
        if not isinstance(cfg, self.config_class):
            raise SAELensError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(cfg).__name__}"
            )
        self.cfg = cfg
        self.dtype = torch_dtype(cfg.dtype)
        self.device = torch.device(cfg.device)
        self.init_parameters()
        self.initialize_weights()
        self.hook_sae_in = HookPoint()
        self.hook_hidden_pre = HookPoint()
        self.hook_hidden_post = HookPoint()
        self.hook_sae_out = HookPoint()
        self.setup()

    # -- construction ---------------------------------------------------------------------------

    def new_parameter(self, *shape: int) -> nn.Parameter:
        """A zero parameter of `shape` in the SAE's dtype and device."""
        return nn.Parameter(torch.zeros(*shape, dtype=self.dtype, device=self.device))

    def init_parameters(self) -> None:
        """Create the parameters: the shared `W_enc`, `W_dec`, `b_dec`, then this architecture's own."""
        d_in, d_out = self.cfg.d_in, self.cfg.output_width
        self.W_enc = self.new_parameter(d_in, self.cfg.d_sae)
        self.W_dec = self.new_parameter(self.cfg.d_sae, d_out)
        self.b_dec = self.new_parameter(d_out)
        if self.cfg.skip_connection:
            self.W_skip = self.new_parameter(d_in, d_out)
        self.init_encoder_parameters()

    def init_encoder_parameters(self) -> None:
        """The encoder's own parameters: `b_enc` here; Gated has its gate and magnitude biases."""
        self.b_enc = self.new_parameter(self.cfg.d_sae)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Random decoder rows of norm `decoder_init_norm` (1 when unset), the encoder as the
        decoder's transpose times `encoder_init_scale` where the config has one, zero biases.

        Starting the encoder at the decoder's transpose makes each latent initially respond to the
        direction it writes, which cuts dead latents early in training (as in the OpenAI TopK work).
        """
        nn.init.kaiming_uniform_(self.W_dec)
        norm = self.cfg.decoder_init_norm if self.cfg.decoder_init_norm is not None else 1.0
        self.W_dec.mul_(norm / self.W_dec.norm(dim=-1, keepdim=True))
        if self.cfg.output_width == self.cfg.d_in:
            self.W_enc.copy_(self.W_dec.T)
        else:  # a transcoder: the decoder's directions live in another space
            nn.init.kaiming_uniform_(self.W_enc)
            self.W_enc.mul_(norm / self.W_enc.norm(dim=0, keepdim=True))
        # Only the TopK family's config declares it (`TopKSAEConfig.initial_encoder_scale`).
        self.W_enc.mul_(getattr(self.cfg, "initial_encoder_scale", 1.0))

    @classmethod
    def from_config(cls, cfg: Any) -> SparseAutoencoder:
        """Build the architecture that `cfg` names."""
        return get_architecture_class(_architecture_of(cfg))(cfg)

    # -- forward --------------------------------------------------------------------------------

    def encoder_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(sae_in, b_dec_path)`: the encoder's input `x - b_dec` (or `x`) and a zero-valued `[d_sae]`
        term to subtract from the pre-activations' bias.

        In training the input needs no gradient, and computing one would cost a `[batch, d_sae] x
        [d_sae, d_in]` matmul. So `sae_in` is detached there, and b_dec's gradient through the
        encoder, `-W_enc @ dL/dpre`, flows instead through `b_dec_path`, which is exactly zero
        (a vector-matrix product, no `[batch, ...]` tensor). When `x` itself requires a gradient
        (attribution through a spliced SAE), `sae_in` keeps its graph and the path term is zero.
        """
        x = self.hook_sae_in(x.to(self.dtype))
        if not self.cfg.apply_b_dec_to_input:
            return x, torch.zeros_like(self.b_dec[:1]).expand(self.cfg.d_sae)
        if x.requires_grad:
            return x - self.b_dec, torch.zeros_like(self.b_dec[:1]).expand(self.cfg.d_sae)
        return (x - self.b_dec).detach(), b_dec_gradient_path(self.b_dec, self.W_enc)

    def encode_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations `[..., d_sae]`: (x - b_dec) @ W_enc + b_enc."""
        sae_in, b_dec_path = self.encoder_input(x)
        return self.hook_hidden_pre(linear(sae_in, self.W_enc, self.b_enc - b_dec_path))

    def activation(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """The architecture's nonlinearity; ReLU here."""
        return torch.relu(hidden_pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Activations `[..., d_in]` -> latents `[..., d_sae]`."""
        return self.hook_hidden_post(self.activation(self.encode_pre(x)))

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """Latents `[..., d_sae]` -> reconstruction `[..., d_in]`."""
        return self.hook_sae_out(linear(feature_acts, self.W_dec, self.b_dec))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction `[..., d_out]` of activations `[..., d_in]` (with the skip path, if any)."""
        out = self.decode(self.encode(x))
        return out + self.skip(x) if self.cfg.skip_connection else out

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip path `x @ W_skip` `[..., d_out]` (zeros without one)."""
        if not self.cfg.skip_connection:
            return torch.zeros(*x.shape[:-1], self.cfg.output_width, dtype=self.dtype, device=x.device)
        return x.to(self.dtype) @ self.W_skip

    # -- training -------------------------------------------------------------------------------

    def training_forward_pass(
        self,
        x: torch.Tensor,
        dead_neuron_mask: torch.Tensor | None = None,
        l1_coefficient: float | None = None,
        target: torch.Tensor | None = None,
    ) -> TrainStepOutput:
        """Forward pass with the training losses, for `x` `[batch, d_in]`.

        `dead_neuron_mask` `[d_sae]` marks latents that have not fired recently; `l1_coefficient`
        overrides the config's sparsity coefficient (the trainer passes the warmed-up value);
        `target` `[batch, d_out]` is what a transcoder should output (the input itself when unset).
        """
        batch = self.encode_for_training(x)
        batch.target = target
        sae_out = self.decode_for_training(batch)
        if self.cfg.skip_connection:
            sae_out = sae_out + self.skip(x)
        batch.sae_out = sae_out
        batch.dead_neuron_mask = dead_neuron_mask
        coefficient = self.sparsity_coefficient if l1_coefficient is None else l1_coefficient
        batch.l1_coefficient = coefficient or 0.0
        losses = {"mse": per_token_squared_error(sae_out, batch.goal).mean(), **self.auxiliary_losses(batch)}
        loss = losses["mse"]
        for name, value in losses.items():
            if name != "mse":
                loss = loss + value
        return TrainStepOutput(sae_out, batch.feature_acts.detach(), loss, losses)

    def encode_for_training(self, x: torch.Tensor) -> TrainingBatch:
        """The latents of a training batch `[batch, d_in]`; dense, through the hooks, by default."""
        hidden_pre = self.encode_pre(x)
        return TrainingBatch(x, self.hook_hidden_post(self.activation(hidden_pre)), hidden_pre)

    def decode_for_training(self, batch: TrainingBatch) -> torch.Tensor:
        """The reconstruction `[batch, d_out]` of a training batch's latents."""
        return self.decode(batch.feature_acts)

    def auxiliary_losses(self, batch: TrainingBatch) -> dict[str, torch.Tensor]:
        """The architecture's loss terms besides the MSE, by name, already weighted."""
        return {}

    @property
    def sparsity_coefficient(self) -> float | None:
        """The configured weight of the sparsity penalty (`l1_coefficient`), or None without one."""
        return getattr(self.cfg, "l1_coefficient", None)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale decoder rows to unit norm (after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the part of each decoder row's gradient along the row itself.

        With rows renormalised after every step, the parallel component only changes a row's
        length, which the renormalisation undoes; Adam would still count it in its moment
        estimates, so it is removed first.
        """
        if self.W_dec.grad is None:
            return
        W_dec_unit = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        parallel = (self.W_dec.grad * W_dec_unit).sum(dim=-1, keepdim=True)
        self.W_dec.grad.sub_(parallel * W_dec_unit)

    # -- weight surgery -------------------------------------------------------------------------

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Make decoder rows unit norm and move their norms into the encoder (same outputs)."""
        norms = self.W_dec.norm(dim=-1)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        """Fold an input scale s (trained on s*x) into the weights so the SAE takes raw x."""
        for name, tensor in fold_input_scale(dict(self.named_parameters()), scaling_factor).items():
            getattr(self, name).copy_(tensor)

    # -- saving and loading ---------------------------------------------------------------------

    def save_model(
        self,
        path: str | Path,
        sparsity: torch.Tensor | None = None,
        *,
        input_scale: float = 1.0,
        config: SAEConfig | None = None,
    ) -> Path:
        """Write `cfg.json`, `sae_weights.safetensors` and, given `sparsity` (log10 feature density,
        `[d_sae]`), `sparsity.safetensors` into folder `path`, each file atomically.

        `input_scale`: the scale the SAE was trained on (inputs `s * x`); the saved weights take raw
        activations, folded into a copy so this SAE is left as it is. `config`: what to write as
        `cfg.json` instead of `self.cfg` (BatchTopK writes its JumpReLU equivalent).
        """
        state = dict(self.state_dict())
        if input_scale != 1.0:
            state.update(fold_input_scale(state, input_scale))
        return write_sae_folder(path, (config or self.cfg).to_dict(), state, sparsity)

    @classmethod
    def load_from_disk(
        cls,
        path: str | Path,
        device: str | None = None,
        dtype: str | None = None,
        sae_id: str | None = None,
    ) -> SparseAutoencoder:
        """Load an SAE folder in any registered format (ours, SAELens', sparsify's, dictionary_learning's,
        Gemma Scope's, ...; see `sae_lens.converters`).

        `sae_id` picks one SAE of a folder that holds several (a sparsify run's hookpoint, a sweep's
        trainer, a hook-z file). `device` and `dtype` override what the files say; the weights are
        read straight onto `device` once, with no second copy made while building the SAE.
        """
        files = read_sae_folder(path, device, sae_id=sae_id)
        source = str(Path(path) / sae_id) if sae_id else str(path)
        return cls.from_files(files, source=source, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(
        cls,
        release: str,
        sae_id: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        force_download: bool = False,
    ) -> SparseAutoencoder:
        """The SAE `sae_id` of `release`: a registry release (`sae-lens list`), a Hugging Face repo
        id holding SAEs in any known format (`sae_id` = the folder in the repo), or a local folder.

        Files come through `huggingface_hub` into its standard cache, so once cached a release also
        loads with `HF_HUB_OFFLINE=1`. `device` and `dtype` override the files' (default: the
        files' dtype); `force_download` re-downloads cached files.
        """
        return cls.from_pretrained_with_cfg_and_sparsity(release, sae_id, device, dtype, force_download)[0]

    @classmethod
    def from_pretrained_with_cfg_and_sparsity(
        cls,
        release: str,
        sae_id: str | None = None,
        device: str = "cpu",
        dtype: str | None = None,
        force_download: bool = False,
    ) -> tuple[SparseAutoencoder, dict[str, Any], torch.Tensor | None]:
        """`(sae, cfg_dict, log_feature_sparsity)` for `from_pretrained`'s arguments; the sparsity
        (log10 feature densities `[d_sae]`) is None when the release publishes none."""
        # Imported here: hub.py needs huggingface_hub and the registry, which building SAEs does not.
        from sae_lens.hub import read_pretrained

        files, source = read_pretrained(release, sae_id, device=device, force_download=force_download)
        sparsity = files.log_feature_sparsity
        sae = cls.from_files(files, source=source, device=device, dtype=dtype)
        return sae, sae.cfg.to_dict(), sparsity

    @classmethod
    def from_files(
        cls, files: SAEFiles, source: str, device: str | None = None, dtype: str | None = None
    ) -> SparseAutoencoder:
        """Build the SAE a format read (`sae_files.SAEFiles`) on `device` (default: the CPU, whatever
        device the files name) in `dtype` (default: the files').

        The SAE is built on the meta device (no memory, no random initialisation) and the read
        tensors, moved to the target dtype and device one at a time, become its parameters: loading
        never holds a second copy of the weights. The tensors are taken over: `files.state_dict`
        is empty afterwards.
        """
        # The device a file records is where it was trained (often "cuda" or "mps"), not where it
        # is wanted now: it is never used, and the default is the CPU.
        overrides = {"device": device or "cpu"} | ({"dtype": dtype} if dtype is not None else {})
        cfg = SAEConfig.from_dict(files.config | overrides)
        sae = get_architecture_class(cfg.architecture)(dataclasses.replace(cfg, device="meta"))
        sae.cfg = cfg
        sae.device = torch.device(cfg.device)
        sae.load_weights(files.state_dict, source)
        return sae

    def load_weights(self, state: dict[str, torch.Tensor], source: str) -> None:
        """Load a state dict after checking its names and shapes against this SAE's.

        On an SAE built on the meta device the tensors (in this SAE's dtype and device) become the
        parameters (`assign`); otherwise they are copied in. Entries are popped from `state` as they
        are converted, so a tensor in another dtype or device is freed once its copy exists.
        """
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise SAELensError(
                f"the weights in {source!r} do not match a {self.cfg.architecture} SAE "
                f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'})"
            )
        for name, tensor in state.items():
            if tensor.shape != expected[name].shape:
                raise SAELensError(
                    f"{name} in {source!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[name].shape)} from the config"
                )
        on_meta = any(t.is_meta for t in itertools.chain(self.parameters(), self.buffers()))
        converted = {}
        for name in list(state):
            converted[name] = state.pop(name).to(device=self.device, dtype=self.dtype)
        self.load_state_dict(converted, assign=on_meta)
        left = [
            name for name, t in itertools.chain(self.named_parameters(), self.named_buffers()) if t.is_meta
        ]
        if left:
            raise SAELensError(f"loading {source!r} left {', '.join(left)} unset (no weights for them)")


def _architecture_of(cfg: Any) -> str:
    name = getattr(cfg, "architecture", "")
    if not name:
        raise SAELensError(
            f"{type(cfg).__name__} names no architecture; use an architecture's config "
            "(e.g. StandardSAEConfig, TopKSAEConfig) or SAEConfig.from_dict"
        )
    return name


# -- maths shared by the architectures --------------------------------------------------------------


def fold_input_scale(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The weights that take raw `x` for an SAE trained on `scale * x` (new tensors).

    Pre-activations `(s x - b_dec) @ W_enc` equal `(x - b_dec / s) @ (s W_enc)`, and the output
    `(f @ W_dec + b_dec) / s` is `f @ (W_dec / s) + b_dec / s`; every other parameter is unchanged.
    """
    return {
        "W_enc": state["W_enc"] * scale,
        "W_dec": state["W_dec"] / scale,
        "b_dec": state["b_dec"] / scale,
    }


def b_dec_gradient_path(b_dec: torch.Tensor, W_enc: torch.Tensor) -> torch.Tensor:
    """`(b_dec - b_dec.detach()) @ W_enc.detach()`: exactly zero, with gradient `W_enc` w.r.t. b_dec.

    Subtracting it from a pre-activation bias gives b_dec the gradient it would get through
    `x - b_dec`; adding it cancels that gradient. W_enc's own gradient is untouched and no
    `[batch, ...]` tensor is involved.
    """
    return (b_dec - b_dec.detach()) @ W_enc.detach()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weight + bias for `x` `[..., n]`, `weight` `[n, m]`; one fused addmm for 2-D inputs."""
    if x.ndim == 2:
        return torch.addmm(bias, x, weight)
    return x @ weight + bias


def latent_fire_counts(feature_acts: torch.Tensor) -> torch.Tensor:
    """How many tokens each latent fired on, `[d_sae]`, for dense or sparse COO `feature_acts`."""
    if feature_acts.is_sparse:
        latents = feature_acts._indices()[1][feature_acts._values() > 0]
        return torch.bincount(latents, minlength=feature_acts.shape[1])
    # In row chunks, summed as int32: `(acts > 0).sum(dim=0)` over the whole batch first converts
    # the mask to a [batch, d_sae] int64 tensor (256 MB at 4096 x 8192; ~3x slower on 2 cores).
    flat = feature_acts.reshape(-1, feature_acts.shape[-1])
    counts = torch.zeros(flat.shape[1], dtype=torch.long, device=flat.device)
    rows = max(1, (1 << 22) // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], rows):
        counts += (flat[start : start + rows] > 0).sum(dim=0, dtype=torch.int32)
    return counts


def per_token_squared_error(sae_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """‖x̂ - x‖² per token, `[batch]`."""
    return (sae_out - x.to(sae_out.dtype)).pow(2).sum(dim=-1)


def decoder_weighted_lp(
    feature_acts: torch.Tensor, W_dec: torch.Tensor, p: float, column_sums: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over tokens of ‖f ⊙ ‖W_dec rows‖‖_p, for non-negative latents `[batch, d_sae]`.

    Weighting by the decoder norms keeps the penalty honest if decoder rows are ever not unit norm
    (otherwise the SAE could shrink latents and grow the decoder to dodge it). For p = 1,
    Σ_t Σ_i f_ti n_i = Σ_i n_i Σ_t f_ti: reducing over tokens first skips an abs, a
    `[batch, d_sae]` product and their backward passes; `column_sums` is `f.sum(0)` if already known.
    """
    decoder_norms = W_dec.norm(dim=-1)
    if p == 1:
        if column_sums is None:
            column_sums = feature_acts.sum(dim=0)
        return (column_sums * decoder_norms).sum() / feature_acts.shape[0]
    return (feature_acts * decoder_norms).norm(p=p, dim=-1).mean()


__all__ = [
    "SAEConfig",
    "SparseAutoencoder",
    "TrainStepOutput",
    "TrainingBatch",
    "get_architecture_class",
    "register_architecture",
    "registered_architectures",
]
