"""Splicing SAEs into a running TransformerLens 4 `TransformerBridge`: `HookedSAETransformer`.

The reference SAELens's `HookedSAETransformer` subclasses TransformerLens 3's `HookedTransformer`,
which TransformerLens 4 removed (so `import sae_lens` fails there). This is the same API on TL4's
`TransformerBridge`:

    model = HookedSAETransformer.boot_transformers("sentence-transformers/all-MiniLM-L6-v2")
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
    cache["blocks.3.hook_resid_pre.hook_sae_acts_post"]      # [batch, pos, d_sae]

How a splice works on TL4. A user's hook name is often a TL3-style alias (`blocks.3.hook_resid_pre`)
that TL4 resolves to a canonical hook point (`blocks.3.hook_in`); the model calls the canonical
module, so replacing only the alias attribute would leave the SAE unused. `add_sae` therefore
resolves the name to its HookPoint, puts a `SplicedSAE` (itself a HookPoint) in every place that
held it (the owning component's module slot, the alias attributes, the bridge's hook registry)
and registers the SAE's own hooks under `<name>.hook_sae_*` for the canonical name and each alias.
`reset_saes` puts the original HookPoint object back.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge

from sae_lens.errors import SAELensError
from sae_lens.models import all_special_ids, load_model, validate_hook_point
from sae_lens.saes.sae import SparseAutoencoder

SAE_HOOK_NAMES = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)
"""The hooks a spliced SAE adds under its hook point's name (`blocks.3.hook_resid_pre.hook_sae_acts_post`)."""


class SplicedSAE(HookPoint):
    """The hook point an SAE is spliced into: it runs the SAE and passes its output on.

    It takes the place of the original HookPoint, keeps its name, conversion and position axis, and
    is a HookPoint itself, so hooks on the original name still work while the SAE is in: they see
    the spliced activation the model carries on. Its own hooks, in the SAE's layout `[batch, pos, d]`:

    - `hook_sae_input`: what the SAE reads (for a transcoder, the activation at its `hook_name`);
    - `hook_sae_acts_pre`, `hook_sae_acts_post`: pre-activations and latents `[batch, pos, d_sae]`;
    - `hook_sae_recons`: the SAE's output `sae(x)` (skip path included), after any latent edits;
    - `hook_sae_error`: with the error term, `activation - sae(x)` from a clean pass;
    - `hook_sae_output`: what replaces the activation.

    Editing `hook_sae_acts_pre` changes the latents for every architecture whose `encode` is
    `activation(encode_pre(x))`; a gated SAE's `encode` applies its gate separately, so there the
    pre-activations are reported but edits to them do not reach the output (edit the latents).
    """

    def __init__(
        self,
        sae: SparseAutoencoder,
        original: HookPoint,
        *,
        use_error_term: bool,
        input_hook_name: str | None,
        excluded_token_ids: torch.Tensor | None,
        token_ids: Callable[[], torch.Tensor | None],
    ) -> None:
        super().__init__()
        # Kept out of the module tree so the SAE's parameters stay out of the model's parameters()
        # and state_dict(), and its own hook points out of the model's hook names.
        self.__dict__["sae"] = sae
        self.use_error_term = use_error_term
        self.input_hook_name = input_hook_name
        """The transcoder's input hook (canonical name), or None for an SAE reading this point."""
        self.excluded_token_ids = excluded_token_ids
        """Token ids whose positions keep the model's activation (the SAE was trained without them)."""
        self.token_ids = token_ids
        self.name = original.name
        self.hook_conversion = original.hook_conversion
        self.pos_dim = original.pos_dim
        self.backward_scale = original.backward_scale
        self.head_index: int | None = sae.cfg.metadata.get("hook_head_index")
        for hook_name in SAE_HOOK_NAMES:
            setattr(self, hook_name, HookPoint())
        self._captured_input: tuple[torch.Tensor, Any] | None = None

    sae: SparseAutoencoder
    hook_sae_input: HookPoint
    hook_sae_acts_pre: HookPoint
    hook_sae_acts_post: HookPoint
    hook_sae_recons: HookPoint
    hook_sae_error: HookPoint
    hook_sae_output: HookPoint

    def __repr__(self) -> str:
        cfg = self.sae.cfg
        error = ", error term" if self.use_error_term else ""
        return f"SplicedSAE(name={self.name!r}, {cfg.architecture} d_in={cfg.d_in} d_sae={cfg.d_sae}{error})"

    def capture_input(self, module: nn.Module, inputs: Any, output: Any) -> None:
        """Forward hook on a transcoder's input hook point: keep the activation for this pass."""
        self._captured_input = (output, getattr(module, "hook_conversion", None))

    def clear_captured_input(self) -> None:
        """Drop a captured transcoder input (at the end of each forward pass)."""
        self._captured_input = None

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        """The spliced activation, in the layout the model passes this point (`activation`'s)."""
        if not isinstance(activation, torch.Tensor):
            raise SAELensError(
                f"cannot splice an SAE into {self.name!r}: it carries a {type(activation).__name__}"
            )
        sae = self.sae
        # The layout users' hooks see here (e.g. hook_z as [batch, pos, n_heads, d_head]).
        target = _convert(activation, self.hook_conversion)
        if self.input_hook_name is None:
            source = target
        else:
            if self._captured_input is None:
                raise SAELensError(
                    f"transcoder at {self.name!r}: its input hook {self.input_hook_name!r} did not run "
                    "before its output hook in this forward pass"
                )
            captured, conversion = self._captured_input
            self._captured_input = None
            source = _convert(captured, conversion)
        clean_input = _sae_view(source, sae.cfg.d_in, self.head_index, self.name, "d_in")
        goal = _sae_view(target, sae.cfg.output_width, self.head_index, self.name, "d_out")

        sae_input = self.hook_sae_input(clean_input)
        acts_pre = self.hook_sae_acts_pre(sae.encode_pre(sae_input))
        if type(sae).encode is SparseAutoencoder.encode:
            acts_post = sae.hook_hidden_post(sae.activation(acts_pre))
        else:  # e.g. gated: the gate is not a function of the magnitude pre-activations
            acts_post = sae.encode(sae_input)
        acts_post = self.hook_sae_acts_post(acts_post)
        recons = sae.decode(acts_post)
        if sae.cfg.skip_connection:
            recons = recons + sae.skip(sae_input)
        recons = self.hook_sae_recons(recons)

        if self.use_error_term:
            with torch.no_grad(), _hooks_disabled(sae):
                clean = sae(clean_input)
                goal_value = goal.detach().to(clean.dtype)
                error = goal_value - clean
            # A clone, so a hook editing the error in place still counts as an edit below.
            hooked_error = self.hook_sae_error(error.clone())
            # Equal to recons + hooked_error, written so that without edits it is the model's own
            # activation bit for bit (recons == clean, so both differences are exactly zero), and
            # gradients flow only through the SAE's path (goal_value and error carry none).
            output = goal_value + (recons - clean) + (hooked_error - error)
        else:
            output = recons
        output = self.hook_sae_output(output).to(goal.dtype)

        if self.excluded_token_ids is not None:
            keep = self._special_positions(goal)
            output = torch.where(keep, goal, output)
        return _revert(_write_view(target, output, self.head_index), self.hook_conversion)

    def _special_positions(self, goal: torch.Tensor) -> torch.Tensor:
        """`[batch, pos, 1]` bool: positions holding an excluded token id."""
        token_ids = self.token_ids()
        if token_ids is None:
            raise SAELensError(
                f"the SAE at {self.name!r} was trained without special tokens (exclude_special_tokens) and "
                "keeps them by token id, but this forward pass had no input ids (inputs_embeds or "
                "start_at_layer); pass token ids, or set sae.cfg.metadata['exclude_special_tokens'] = False"
            )
        if tuple(token_ids.shape) != tuple(goal.shape[:2]):
            raise SAELensError(
                f"the SAE at {self.name!r} keeps special tokens by id, but the input ids have shape "
                f"{tuple(token_ids.shape)} and the activation {tuple(goal.shape)}"
            )
        assert self.excluded_token_ids is not None
        excluded = self.excluded_token_ids.to(token_ids.device)
        return torch.isin(token_ids, excluded).to(goal.device)[..., None]


@dataclass
class _Splice:
    """One SAE in the model, and what `reset_saes` needs to take it out again."""

    spliced: SplicedSAE
    original: HookPoint
    hook_name: str
    """The SAE's `hook_name`, as given."""
    slots: list[tuple[dict[str, Any], str]]
    """Every (dict, key) that held the original HookPoint: module slots, alias attributes, registries."""
    registry_names: list[str]
    """The names this splice added to the bridge's hook registry (`<name>.hook_sae_*`)."""
    input_hook_name: str | None = None
    capture: RemovableHandle | None = field(default=None, repr=False)


class HookedSAETransformer(TransformerBridge):
    """A TransformerLens 4 `TransformerBridge` into which SAEs and transcoders can be spliced.

    Build it with `HookedSAETransformer.boot_transformers(name_or_path, device=...)` (the MiniLM
    aliases and local folders load as in `sae_lens.models.load_model`), or turn a loaded bridge
    into one with `HookedSAETransformer.from_bridge(model)` (in place, no reload). Without SAEs it
    behaves exactly as the bridge.
    """

    _splices: dict[str, _Splice]
    _token_ids: torch.Tensor | None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_splicing()

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def boot_transformers(
        cls, model_name: str, device: str | torch.device = "cpu", dtype: str = "float32"
    ) -> HookedSAETransformer:
        """Load a hub name or local folder (MiniLM aliases offline) as a `HookedSAETransformer`."""
        return cls.from_bridge(load_model(model_name, device=device, dtype=dtype))

    @classmethod
    def from_bridge(cls, bridge: TransformerBridge) -> HookedSAETransformer:
        """`bridge` itself, turned into a `HookedSAETransformer` in place: no weights are reloaded
        or copied, and the returned object is `bridge`."""
        if isinstance(bridge, cls):
            return bridge
        if type(bridge) is not TransformerBridge:
            raise SAELensError(
                f"from_bridge takes a TransformerBridge (e.g. from sae_lens.load_model); got {type(bridge).__name__}"
            )
        bridge.__class__ = cls
        assert isinstance(bridge, cls)
        bridge._init_splicing()
        return bridge

    def _init_splicing(self) -> None:
        self._splices = {}
        self._token_ids = None
        # Keeping special tokens needs the input ids inside the forward pass; the token embedding
        # is where every string, list or tensor input arrives as ids.
        embed = self._modules.get("embed")
        if embed is not None:
            embed.register_forward_pre_hook(self._record_token_ids, with_kwargs=True)

    def _record_token_ids(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids", kwargs.get("input"))
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self._token_ids = ids

    # -- attaching and removing SAEs ------------------------------------------------------------

    @property
    def acts_to_saes(self) -> dict[str, SparseAutoencoder]:
        """The attached SAEs by their `hook_name`."""
        return {splice.hook_name: splice.spliced.sae for splice in self._splices.values()}

    def add_sae(self, sae: SparseAutoencoder, use_error_term: bool = False) -> None:
        """Splice `sae` into the hook its `cfg.metadata["hook_name"]` names, until `reset_saes`.

        A transcoder (`metadata["hook_name_out"]` another hook) reads `hook_name`, which is left as
        it is, and replaces the activation at `hook_name_out` with its output. An SAE already at the
        point it writes is replaced. `use_error_term`: add `activation - sae(x)` (from a clean pass,
        no gradient) to the output, so the model's outputs are unchanged until you edit the SAE's
        latents, and an edit changes them by exactly its own effect.
        """
        hook_name = sae.cfg.metadata.get("hook_name")
        if not hook_name:
            raise SAELensError(
                "the SAE's cfg.metadata has no hook_name; set sae.cfg.metadata['hook_name'] to the hook it "
                "reads, e.g. 'blocks.3.hook_resid_pre'"
            )
        output_name = sae.cfg.metadata.get("hook_name_out") or hook_name
        canonical = self._canonical_hook_name(output_name)
        input_canonical = self._canonical_hook_name(hook_name)
        self._check_device(sae)
        excluded = self._excluded_token_ids(sae)
        if canonical in self._splices:
            self._remove_splice(canonical)
        original = self._hook_registry[canonical]
        is_transcoder = input_canonical != canonical
        spliced = SplicedSAE(
            sae,
            original,
            use_error_term=use_error_term,
            input_hook_name=input_canonical if is_transcoder else None,
            excluded_token_ids=excluded,
            token_ids=lambda: self._token_ids,
        )
        names = [name for name, point in self._hook_registry.items() if point is original]
        slots = self._slots_holding(original)
        for container, key in slots:
            container[key] = spliced
        registry_names = []
        for name in dict.fromkeys([*names, output_name]):
            for suffix in SAE_HOOK_NAMES:
                point = getattr(spliced, suffix)
                point.name = f"{canonical}.{suffix}"
                self._hook_registry[f"{name}.{suffix}"] = point
                registry_names.append(f"{name}.{suffix}")
        self._splices[canonical] = _Splice(
            spliced, original, hook_name, slots, registry_names, input_canonical if is_transcoder else None
        )
        self._hook_registry_changed()

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """Take out the SAEs at `act_names` (their `hook_name`, `hook_name_out` or canonical name;
        all when None), putting each original hook point back."""
        if act_names is None:
            keys = list(self._splices)
        else:
            keys = [
                self._splice_key(name) for name in ([act_names] if isinstance(act_names, str) else act_names)
            ]
        for key in keys:
            self._remove_splice(key)

    @contextmanager
    def saes(
        self,
        saes: SparseAutoencoder | Iterable[SparseAutoencoder] = (),
        reset_saes_end: bool = True,
        use_error_term: bool = False,
    ) -> Iterator[HookedSAETransformer]:
        """Attach `saes` for the block; on exit (with `reset_saes_end`) take them out and put back
        any SAE they displaced, with its own error-term setting."""
        sae_list = [saes] if isinstance(saes, SparseAutoencoder) else list(saes)
        displaced: list[tuple[str, _Splice | None]] = []
        try:
            for sae in sae_list:
                key = self._canonical_hook_name(sae.cfg.metadata.get("hook_name_out") or _hook_name_of(sae))
                displaced.append((key, self._splices.get(key)))
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            if reset_saes_end:
                for key, previous in reversed(displaced):
                    self._remove_splice(key)
                    if previous is not None:
                        self.add_sae(previous.spliced.sae, use_error_term=previous.spliced.use_error_term)

    # -- running with SAEs ----------------------------------------------------------------------

    def run_with_saes(
        self,
        *model_args: Any,
        saes: SparseAutoencoder | Iterable[SparseAutoencoder] = (),
        reset_saes_end: bool = True,
        use_error_term: bool = False,
        **model_kwargs: Any,
    ) -> Any:
        """The model's forward pass (logits `[batch, pos, d_vocab]` by default) with `saes` attached."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(
        self,
        *model_args: Any,
        saes: SparseAutoencoder | Iterable[SparseAutoencoder] = (),
        reset_saes_end: bool = True,
        use_error_term: bool = False,
        **cache_kwargs: Any,
    ) -> tuple[Any, Any]:
        """`run_with_cache` with `saes` attached: `(output, cache)`, the cache holding the SAEs'
        `<hook>.hook_sae_*` activations too (`names_filter` and the other options as usual)."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_cache(*model_args, **cache_kwargs)

    def run_with_hooks_with_saes(
        self,
        input: Any,
        *,
        saes: SparseAutoencoder | Iterable[SparseAutoencoder] = (),
        reset_saes_end: bool = True,
        use_error_term: bool = False,
        fwd_hooks: list[tuple[str | Callable, Callable]] | None = None,
        bwd_hooks: list[tuple[str | Callable, Callable]] | None = None,
        **hook_kwargs: Any,
    ) -> Any:
        """`run_with_hooks` with `saes` attached; hooks may name the SAEs' `<hook>.hook_sae_*` points."""
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_hooks(
                input, fwd_hooks=fwd_hooks or [], bwd_hooks=bwd_hooks or [], **hook_kwargs
            )

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The bridge's forward pass, with the input ids and transcoder inputs kept for the splices."""
        self._token_ids = None
        # Registered afresh each pass, so each capture runs after the hooks users have added to a
        # transcoder's input point and the transcoder reads what the model passes on.
        self._attach_transcoder_captures()
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._token_ids = None
            for splice in self._splices.values():
                splice.spliced.clear_captured_input()

    # -- internals ------------------------------------------------------------------------------

    def _canonical_hook_name(self, hook_name: str) -> str:
        """The canonical name of the hook point `hook_name` (an alias or canonical name) resolves to."""
        if ".hook_sae_" in hook_name:
            raise SAELensError(
                f"{hook_name!r} is a spliced SAE's own hook; splice SAEs into the model's hooks"
            )
        validate_hook_point(self, hook_name)
        point = self.hook_dict[hook_name]
        canonical = point.name or hook_name
        reason = self._gated_hook_reason(canonical)
        if reason is not None:
            raise SAELensError(
                f"hook {hook_name!r} does not fire while cfg.{reason} is False; call model.set_{reason}(True) "
                "before splicing an SAE into it"
            )
        return canonical

    def _splice_key(self, name: str) -> str:
        for key, splice in self._splices.items():
            metadata = splice.spliced.sae.cfg.metadata
            if name in (key, splice.hook_name, metadata.get("hook_name_out"), splice.input_hook_name):
                return key
        attached = ", ".join(splice.hook_name for splice in self._splices.values()) or "none"
        raise SAELensError(f"no SAE is attached at {name!r} (attached: {attached})")

    def _remove_splice(self, key: str) -> None:
        splice = self._splices.pop(key, None)
        if splice is None:
            return
        for container, slot in splice.slots:
            if container.get(slot) is splice.spliced:
                container[slot] = splice.original
        for name in splice.registry_names:
            self._hook_registry.pop(name, None)
        if splice.capture is not None:
            splice.capture.remove()
        self._hook_registry_changed()

    def _hook_registry_changed(self) -> None:
        # TL4 memoises per-block aliases on the registry's size, which a splice can leave unchanged.
        self._block_alias_cache = None
        self._attach_transcoder_captures()

    def _attach_transcoder_captures(self) -> None:
        """(Re)register each transcoder's capture on whatever module sits at its input point now."""
        for splice in self._splices.values():
            if splice.input_hook_name is None:
                continue
            if splice.capture is not None:
                splice.capture.remove()
            point = self._hook_registry[splice.input_hook_name]
            splice.capture = point.register_forward_hook(splice.spliced.capture_input)

    def _slots_holding(self, point: HookPoint) -> list[tuple[dict[str, Any], str]]:
        """Every (dict, key) in the model that refers to `point`: the component's module slot, alias
        attributes set on components and the bridge, and the hook registries."""
        slots: list[tuple[dict[str, Any], str]] = []
        seen: set[int] = set()
        for module in self.modules():
            registry = module.__dict__.get("_hook_registry")
            for container in (module._modules, module.__dict__, registry):
                if not isinstance(container, dict) or id(container) in seen:
                    continue
                seen.add(id(container))
                slots.extend((container, key) for key, value in container.items() if value is point)
        return slots

    def _check_device(self, sae: SparseAutoencoder) -> None:
        model_device = next(self.original_model.parameters()).device
        if sae.W_dec.device.type != model_device.type:
            raise SAELensError(
                f"the SAE is on {sae.W_dec.device} and the model on {model_device}; move one with .to()"
            )

    def _excluded_token_ids(self, sae: SparseAutoencoder) -> torch.Tensor | None:
        """The ids whose positions keep the model's activation, from `metadata["exclude_special_tokens"]`
        (true: every special id of the tokenizer; a list: those ids), or None."""
        setting = sae.cfg.metadata.get("exclude_special_tokens")
        if not setting:
            return None
        if "embed" not in self._modules:
            raise SAELensError(
                "the SAE keeps special tokens (exclude_special_tokens) by input id, but this model has no "
                "token embedding to read ids from; set sae.cfg.metadata['exclude_special_tokens'] = False"
            )
        if setting is True:
            ids = all_special_ids(self.tokenizer)
        elif isinstance(setting, list | tuple):
            ids = [int(token_id) for token_id in setting]
        else:
            raise SAELensError(
                f"metadata exclude_special_tokens must be true, false or a list of token ids; got {setting!r}"
            )
        return torch.tensor(sorted(ids), dtype=torch.long)


def _hook_name_of(sae: SparseAutoencoder) -> str:
    hook_name = sae.cfg.metadata.get("hook_name")
    if not hook_name:
        raise SAELensError("the SAE's cfg.metadata has no hook_name; set sae.cfg.metadata['hook_name']")
    return hook_name


def _convert(value: torch.Tensor, conversion: Any) -> torch.Tensor:
    return conversion.convert(value) if conversion is not None else value


def _revert(value: torch.Tensor, conversion: Any) -> torch.Tensor:
    return conversion.revert(value) if conversion is not None else value


def _sae_view(
    activation: torch.Tensor, width: int, head_index: int | None, hook_name: str | None, what: str
) -> torch.Tensor:
    """What an SAE of `width` reads or writes at a hook: the activation `[batch, pos, width]`, or on a
    per-head hook `[batch, pos, n_heads, d_head]` one head (`head_index`) or all heads concatenated."""
    if activation.ndim == 4 and head_index is not None and activation.shape[-1] == width:
        return activation[:, :, head_index]
    if activation.ndim == 4 and activation.shape[-2] * activation.shape[-1] == width:
        return activation.flatten(-2)
    if activation.ndim != 4 and activation.shape[-1] == width:
        return activation
    raise SAELensError(
        f"an SAE with {what}={width} does not fit {hook_name!r}, whose activation has shape "
        f"{tuple(activation.shape)}; check the SAE's hook_name (and hook_head_index for per-head hooks)"
    )


def _write_view(activation: torch.Tensor, values: torch.Tensor, head_index: int | None) -> torch.Tensor:
    """`activation` with its `_sae_view` replaced by `values`; a new tensor."""
    if activation.ndim == 4 and head_index is not None and activation.shape[-1] == values.shape[-1]:
        spliced = activation.clone()
        spliced[:, :, head_index] = values
        return spliced
    return values.reshape(activation.shape)


@contextmanager
def _hooks_disabled(module: nn.Module) -> Iterator[None]:
    """No forward or backward hooks fire on `module` or its submodules inside the block."""
    names = ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks")
    saved = [(sub, [getattr(sub, name) for name in names]) for sub in module.modules()]
    for sub, _ in saved:
        for name in names:
            setattr(sub, name, OrderedDict())
    try:
        yield
    finally:
        for sub, hooks in saved:
            for name, value in zip(names, hooks, strict=True):
                setattr(sub, name, value)


__all__ = ["SAE_HOOK_NAMES", "HookedSAETransformer", "SplicedSAE"]
