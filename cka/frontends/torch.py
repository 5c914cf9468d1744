r"""PyTorch frontend: hook an ``nn.Module``'s layers and hand their Grams to the comparer.

>>> from cka import CKA                    # the comparer (cka.compare), re-exported here for torch_cka users
>>> cka = CKA(model1, model2, model1_name="ResNet18", model2_name="ResNet34", device="cuda")  # doctest: +SKIP
>>> result = cka.compare(dataloader)       # one iteration of the loader feeds both models  # doctest: +SKIP
>>> cka.export()["CKA"].shape, result.matrix.shape                                          # doctest: +SKIP

How it computes (DESIGN.md): a forward hook on each selected module turns the module's output into
its ``(n, n)`` float64 Gram at once (first tensor of the output, optional einops reduction, features
centred, Gram product in the feature dtype) and writes it into this side's one preallocated
``(L, n, n)`` stack (:class:`~cka.frontends._common.GramStack`), so no layer's feature map outlives
its hook and no list of Grams or stacked copy exists beside the stack: extra memory is
``L n^2`` float64 numbers per side whatever the feature size. The comparer (:mod:`cka.compare`)
accumulates the stacks on the device, with no host synchronisation per batch.

Layer selection (:func:`select_layers`): exact module names (as in ``model.named_modules()``), glob
patterns (``"layer*.conv?"``), module types (``nn.Conv2d``), callables ``(name, module) -> bool``, or
a list mixing them; rows follow the list, a pattern/type/callable expands in ``named_modules()``
order. The default (:func:`default_layers`) is the outputs of the model's repeated blocks. A
Hugging Face model's ``hidden_states.0`` ... ``hidden_states.L`` (``"hidden_states"`` for all) are
read from its ``output_hidden_states=True`` output instead of hooks (:mod:`cka.frontends.hf`).

Token features (``tokens=``, :mod:`cka.frontends.tokens`): a ``(batch, tokens, ...)`` output becomes
one example per sequence or one per real token inside the hook, before the Gram, using the batch's
``attention_mask`` (or ``mask=``), so padding never reaches the Gram.

A module that runs more than once per forward pass (a shared ``nn.ReLU``, weight-tied layers):
**its first call is recorded**, later calls are ignored (they cost nothing), and a
:class:`LayerCalledTwiceWarning` names the layer after the run. Select a module that runs once (for
a torchvision ``BasicBlock`` the block itself rather than its shared ``relu``) to compare a later call.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from cka.backends import backend_for
from cka.backends.torch import TorchBackend
from cka.compare import CKA
from cka.frontends import tokens as token_math
from cka.frontends._common import (
    GramStack,
    call_arguments,
    check_per_layer_options,
    default_inputs,
    first_tensor,
    module_device,
    never_ran_error,
    per_layer,
    reduce_features,
    select_names,
    to_device,
    torch_inference,
)
from cka.frontends.base import FeatureExtractor
from cka.frontends.hf import (
    HIDDEN_STATES,
    hidden_state_count,
    hidden_state_names,
    hidden_states_of,
    is_hidden_state_spec,
)

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "CKA",
    "LayerCalledTwiceWarning",
    "TorchModel",
    "call_arguments",
    "default_inputs",
    "default_layers",
    "first_tensor",
    "select_layers",
    "wrap",
]

#: One entry of a layer selection: an exact name or glob pattern, a module type, or a predicate.
LayerSpec = str | type | Callable[[str, nn.Module], bool]
#: Picks the tensor to compare from a module's output: index, key, or a function of the output.
OutputSelector = int | str | Callable[[Any], torch.Tensor]

#: Leaf modules the default selection skips: the identity in eval mode, so they duplicate a neighbour.
_SKIPPED_LEAVES = (
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class LayerCalledTwiceWarning(UserWarning):
    """A selected module ran more than once in one forward pass; its first call was recorded."""


# --------------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------------


def default_layers(model: nn.Module) -> list[str]:
    """The default selection: the outputs of the model's repeated blocks.

    A *block* is a child of an ``nn.Sequential`` or ``nn.ModuleList`` that itself has submodules
    and is not a container of such blocks (a stage, like torchvision's ``layer1``, is searched
    instead); outermost only: a block's insides are not searched. That picks the residual blocks of
    torchvision ResNets (``layer1.0`` ... ``layer4.1``), the encoder blocks of torchvision and timm
    ViTs (``encoder.layers.encoder_layer_0``, ``blocks.0``), the transformer layers of Hugging Face
    models (``encoder.layer.0``, ``transformer.h.0``, ``model.layers.0``): the units whose outputs
    the CKA literature compares (Kornblith et al. 2019; Nguyen et al. 2021), about one per depth
    step, so the matrix stays readable. A model without such blocks (an MLP, VGG's flat
    ``features``) gets every leaf module except ``Identity`` and ``Dropout`` (identities in eval
    mode); a model without submodules gets itself (``""``). Extend the default with a list, e.g.
    ``["conv1", *default_layers(model), "fc"]``.

    Parameters
    ----------
    model : nn.Module

    Returns
    -------
    list of str
        Module names in ``named_modules()`` order.
    """
    blocks: list[str] = []

    def composite(module: nn.Module) -> bool:
        return next(module.children(), None) is not None

    def stage(module: nn.Module) -> bool:  # a container of blocks (torchvision's layer1): look inside
        return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and any(
            composite(child) for child in module.children()
        )

    def visit(prefix: str, module: nn.Module) -> None:
        container = isinstance(module, (nn.Sequential, nn.ModuleList))
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if (
                container
                and composite(child)
                and not stage(child)
                and not isinstance(child, (nn.ModuleList, nn.ModuleDict))
            ):
                blocks.append(full)
            else:
                visit(full, child)

    visit("", model)
    if blocks:
        return blocks
    leaves = [
        name
        for name, m in model.named_modules()
        if name and next(m.children(), None) is None and not isinstance(m, _SKIPPED_LEAVES)
    ]
    return leaves or [""]


def select_layers(model: nn.Module, layers: Any = None, *, what: str = "layers") -> list[str]:
    """Resolve a layer selection against ``model.named_modules()``.

    Parameters
    ----------
    model : nn.Module
    layers : None, str, type, callable, or a sequence of them
        ``None``: :func:`default_layers`. A ``str`` is an exact module name (``""`` is the model
        itself) or, if it holds ``*?[``, a glob pattern over the names (``"layer*.conv?"``); a type
        selects every module that is an instance of it; a callable ``(name, module) -> bool``
        selects where it returns true. In a sequence, rows follow the sequence; each pattern, type
        or callable expands in ``named_modules()`` order. For a Hugging Face model, ``"hidden_states"``
        selects ``hidden_states.0`` ... ``hidden_states.L``, and names or globs starting with
        ``"hidden_states."`` some of them (read from the model's output, not hooked).
    what : str
        How the argument is called in error messages (``"model1_layers"``).

    Returns
    -------
    list of str
        Unique module names, in row order.

    Raises
    ------
    ValueError
        An unknown name (with close matches), a pattern, type or callable that selects nothing, a
        layer selected twice, or an empty selection (the wording of
        :func:`cka.frontends._common.select_names`, shared by every frontend).
    TypeError
        An entry of another type.
    """
    if layers is None:
        return default_layers(model)
    modules = dict(model.named_modules(remove_duplicate=False))
    entries = [layers] if isinstance(layers, (str, type)) or callable(layers) else list(layers)
    hidden = hidden_state_names(model) if any(is_hidden_state_spec(e) for e in entries) else []
    entries = [f"{HIDDEN_STATES}.*" if e == HIDDEN_STATES else e for e in entries]

    def match(spec: Any, names: Sequence[str]) -> list[str] | None:
        names = [n for n in names if n in modules]  # hidden states are selected by name only
        if isinstance(spec, type):
            return [n for n in names if isinstance(modules[n], spec)] if issubclass(spec, nn.Module) else None
        if callable(spec) and not isinstance(spec, nn.Module):
            return [n for n in names if spec(n, modules[n])]
        return None

    return select_names(
        list(modules) + hidden,
        entries,
        what=what,
        owner=type(model).__name__,
        match=match,
        accepted="a module name or glob pattern (str), an nn.Module type or a callable (name, module) -> bool",
        listing="List the names with [n for n, _ in model.named_modules()]"
        + (f" (and {hidden[0]} ... {hidden[-1]})." if hidden else "."),
    )


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _select_output(output: Any, selector: OutputSelector | None, layer: str) -> torch.Tensor:
    """Apply ``selector`` (None: :func:`first_tensor`; int: index; str: key or attribute; callable)."""
    if selector is None:
        tensor = first_tensor(output)
    elif callable(selector):
        tensor = selector(output)
    elif isinstance(selector, str):
        tensor = output[selector] if isinstance(output, Mapping) else getattr(output, selector)
    else:
        tensor = output[selector]
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(
            f"layer {layer!r}: its output is a {type(output).__name__} and the output selector gave "
            f"{type(tensor).__name__}, not a tensor; pass output={{{layer!r}: ...}} (an index, key or "
            f"function of the output) that picks the tensor to compare."
        )
    return tensor


# --------------------------------------------------------------------------------------------
# The extractor
# --------------------------------------------------------------------------------------------


class TorchModel(FeatureExtractor):
    """A PyTorch module as one side of a comparison: hooks its selected layers.

    Parameters
    ----------
    module : nn.Module
    layers : selection, optional
        See :func:`select_layers`; default :func:`default_layers`.
    name : str, optional
        Display name; default the class name (as torch_cka).
    output : selector or {layer: selector}, optional
        Which tensor of a layer's output to compare; default :func:`first_tensor`.
    reduce : str or {layer: str}, optional
        An einops reduction pattern applied (mean) before the Gram, e.g. ``"b t d -> b d"`` (mean over
        tokens) or ``"b c h w -> b c"`` (global average pool). The batch axis must stay first.
    inputs : callable, optional
        ``batch -> model inputs``: a tensor (one positional argument), a tuple (positional
        arguments) or a dict (keyword arguments). Default :func:`default_inputs`.
    device : str or torch.device, optional
        Move the module there for the run (and back afterwards); default: leave it where it is.
        Inputs go to the module's device.
    tokens : {"mean", "first", "last", "all"} or {layer: mode}, optional
        For ``(batch, tokens, ...)`` outputs: one example per sequence (the mean over its real
        tokens, its first or its last real token) or every real token an example (``"all"``, which
        then applies to every selected layer); padding never reaches the Gram
        (:mod:`cka.frontends.tokens`). Applied after ``output=``, instead of ``reduce=``.
    mask : callable, optional
        ``batch -> (batch, tokens)`` 0/1 tensor of real tokens. Default: the ``attention_mask`` the
        model is called with (a dict batch's, or ``inputs=``'s). Without either every token counts as
        real, with a :class:`~cka.frontends.tokens.NoTokenMaskWarning` when the model gets ``input_ids``.

    Layers named ``hidden_states.N`` are read from a Hugging Face model's ``output_hidden_states=True``
    output after the forward pass, not hooked (:mod:`cka.frontends.hf`).

    While entered (``with``), forward hooks are registered and the module is in eval mode
    (:func:`cka.frontends._common.torch_inference`); leaving removes the hooks and restores each
    submodule's training flag and the module's device, also when the run raised. :meth:`grams` and
    :meth:`features` enter by themselves when called outside.
    """

    def __init__(
        self,
        module: nn.Module,
        layers: Any = None,
        *,
        name: str | None = None,
        output: Any = None,
        reduce: str | Mapping[str, str] | None = None,
        inputs: Callable[[Any], Any] | None = None,
        device: str | torch.device | None = None,
        tokens: str | Mapping[str, str | None] | None = None,
        mask: Callable[[Any], Any] | None = None,
        what: str = "layers",
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"expected a torch.nn.Module (or a cka FeatureExtractor), got {type(module).__module__}."
                f"{type(module).__qualname__}; wrap other frameworks' models in their cka frontend "
                f"(cka.frontends.onnx.OnnxModel, cka.frontends.jax)."
            )
        if inputs is not None and not callable(inputs):
            raise TypeError(f"inputs must be a callable batch -> model inputs; got {type(inputs).__name__}.")
        if reduce is not None and not isinstance(reduce, (str, Mapping)):
            raise TypeError(
                f"reduce must be an einops pattern (str) or a dict layer -> pattern; got {type(reduce).__name__}."
            )
        if mask is not None and not callable(mask):
            raise TypeError(f"mask must be a callable batch -> (batch, tokens) 0/1 tensor; got {type(mask).__name__}.")
        self.module = module
        self.name = name if name is not None else repr(module).split("(")[0]
        self._layers = select_layers(module, layers, what=what)
        named = dict(module.named_modules(remove_duplicate=False))
        #: per layer: the hooked module, or None for a hidden state read from the model's output
        self._modules = [None if is_hidden_state_spec(layer) else named[layer] for layer in self._layers]
        self._n_hidden = hidden_state_count(module) if None in self._modules else 0
        self._outputs = per_layer(output, self._layers, "output")
        self._reductions = per_layer(reduce, self._layers, "reduce")
        self._tokens = _token_modes(tokens, self._layers, self._reductions)
        self._mask = mask
        self._layout: token_math.TokenLayout | None = None
        self._counts: np.ndarray | None = None
        self._inputs = inputs
        self.device = torch.device(device) if device is not None else None
        self._entered = 0
        self._exit_stack: contextlib.ExitStack | None = None
        self._forward: Callable[..., Any] | None = None
        self._transform: Callable[[torch.Tensor], Any] | None = None
        self._results: list[Any] = []
        self._calls: list[int] = []
        self._stack = GramStack(self._layers)
        self._sink: GramStack | None = None
        #: Layer name -> most calls seen in one forward pass, for layers that ran more than once.
        self.repeated_calls: dict[str, int] = {}

    # -- FeatureExtractor ----------------------------------------------------------------------

    def fingerprint(self) -> str:
        """SHA-256 over the names, shapes, dtypes and bytes of the module's parameters and buffers."""
        import hashlib

        digest = hashlib.sha256()
        for key, tensor in sorted(self.module.state_dict().items()):
            flat = tensor.detach().reshape(-1).contiguous().cpu()
            digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
        tokens = f":tokens={self._tokens}" if any(self._tokens) else ""  # a run over other examples
        return f"torch:{type(self.module).__name__}:{digest.hexdigest()[:32]}:{','.join(self.layer_names())}{tokens}"

    def layer_names(self) -> list[str]:
        return list(self._layers)

    def grams(self, batch: Any, gram_fn: Callable[[Any], Any]) -> torch.Tensor:
        """The ``(L, n, n)`` stack of the selected layers' Grams, each computed inside the layer's forward
        hook and written into this extractor's one preallocated stack. Inside ``with`` (a comparison)
        the stack itself is returned and reused by the next call (copy it to keep it); outside, a copy."""
        with self:
            self._stack.start()
            self._run(batch, gram_fn, sink=self._stack)
            stack = self._stack.result()
            # called outside a comparison: the stack is released on leaving, so hand out a copy
            return stack.clone() if self._entered == 1 else stack

    def features(self, batch: Any) -> dict[str, torch.Tensor]:
        """Selected (and reduced) outputs of each layer for ``batch``, as inference tensors."""
        return dict(zip(self._layers, self._run(batch, lambda t: t), strict=True))

    def start_run(self) -> None:
        self.repeated_calls.clear()

    def run_warnings(self) -> list[tuple[str, type[Warning]]]:
        if not self.repeated_calls:
            return []
        message = (
            f"layer(s) {self.repeated_calls} (name: calls per forward pass) of {self.name} ran more than once per "
            f"forward pass; CKA uses each one's first call. Select a module that runs once to compare a later call."
        )
        return [(message, LayerCalledTwiceWarning)]

    def home_device(self) -> torch.device:
        return self.input_device()

    def token_counts(self) -> np.ndarray | None:
        """With ``tokens="all"``: the last batch's real tokens per sequence (``(b,)`` int64 on the host; the
        Grams' rows are those tokens, sequence by sequence); otherwise None."""
        return self._counts

    @property
    def inputs(self) -> Callable[[Any], Any] | None:
        """The user's ``batch -> model inputs`` hook (None: :func:`default_inputs`); other frontends
        that run this module as a reference (ONNX) call it the same way."""
        return self._inputs

    def input_device(self) -> torch.device:
        """Where this module's inputs go: ``device`` if given, else the module's first parameter's."""
        return self.device if self.device is not None else module_device(self.module)

    # -- Set-up and tear-down ------------------------------------------------------------------

    def __enter__(self) -> Self:
        self._entered += 1
        if self._entered > 1:
            return self
        with contextlib.ExitStack() as stack:
            hooks = [(module, self._make_hook(i)) for i, module in enumerate(self._modules) if module is not None]
            self._forward = stack.enter_context(
                torch_inference(self.module, device=self.device, hooks=hooks, name=self.name)
            )
            self._exit_stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._entered -= 1
        if self._entered == 0 and self._exit_stack is not None:
            stack, self._exit_stack = self._exit_stack, None
            self._forward = self._transform = self._sink = None
            self._results = []
            self._stack.release()
            cast(TorchBackend, backend_for("torch")).release_buffers()  # the core Gram's centring buffer
            stack.close()

    # -- Internals -----------------------------------------------------------------------------

    def _make_hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._transform is None:  # the model ran outside one of our passes
                return
            self._take(index, output)

        return hook

    def _take(self, index: int, output: Any) -> None:
        """Layer ``index``'s output -> the chosen tensor -> tokens or einops reduction -> the transform
        (the Gram) -> the stack. Called by the layer's hook, or after the pass for a hidden state."""
        self._calls[index] += 1
        if self._calls[index] > 1:  # a second call in this pass: the first is kept
            return
        layer = self._layers[index]
        tensor = _select_output(output, self._outputs[index], layer)
        mode = self._tokens[index]
        if mode == "all" and self._counts is None and tensor.dim() >= 2:  # no mask: every token is real
            self._counts = np.full(tensor.shape[0], tensor.shape[1], dtype=np.int64)
        if mode is not None:
            tensor = token_math.reduce_tokens(tensor, self._layout, mode, layer)
        elif self._reductions[index] is not None:
            tensor = reduce_features(tensor, self._reductions[index], layer)
        if tensor.dim() == 0:
            raise ValueError(f"layer {layer!r} produced a scalar; CKA needs one feature vector per example.")
        assert self._transform is not None  # set for the duration of a pass (an internal invariant)
        value = self._transform(tensor)
        if self._sink is not None:
            self._sink.put(index, value)  # into the preallocated stack; the Gram itself is dropped
        else:
            self._results[index] = value

    def _token_layout(self, batch: Any, kwargs: Mapping[str, Any]) -> token_math.TokenLayout | None:
        """This batch's real-token layout (None without ``tokens=`` or without a mask); with
        ``tokens="all"`` also its per-sequence counts for :meth:`token_counts`."""
        self._counts = None
        if all(mode is None for mode in self._tokens):
            return None
        mask, source = token_math.find_mask(batch, kwargs, self._mask)
        if mask is None:
            if "input_ids" in kwargs:
                warnings.warn(
                    f"{self.name}: tokens= is set but the model gets no attention_mask (and no mask= was given), so "
                    f"every token counts as real, padding included; put the tokenizer's attention_mask in the "
                    f"batch, or pass mask=lambda batch: ...",
                    token_math.NoTokenMaskWarning,
                    stacklevel=6,
                )
            return None
        if "all" in self._tokens:  # from the mask where the batch has it (the host, for a tokenizer's)
            self._counts = mask.sum(dim=1).cpu().numpy()
        layout = token_math.token_layout(mask.to(self.input_device(), non_blocking=True))
        token_math.check_real_tokens(layout, self._tokens, source)
        return layout

    def _run(self, batch: Any, transform: Callable[[torch.Tensor], Any], sink: GramStack | None = None) -> list[Any]:
        with self:
            args, kwargs = call_arguments(self._inputs(batch)) if self._inputs is not None else default_inputs(batch)
            device = self.input_device()
            self._layout = self._token_layout(batch, kwargs)
            args, kwargs = to_device(args, device), to_device(kwargs, device)
            if self._n_hidden:
                kwargs["output_hidden_states"] = True
            self._results = [None] * len(self._layers)
            self._calls = [0] * len(self._layers)
            self._transform, self._sink = transform, sink
            try:
                assert self._forward is not None  # set by __enter__
                output = self._forward(*args, **kwargs)
                if self._n_hidden:  # the hidden states, taken like hooked outputs once the pass is over
                    states = hidden_states_of(output, self._n_hidden, self.name)
                    with torch.inference_mode():  # as inside a hook: the stack may hold inference tensors
                        for index, layer in enumerate(self._layers):
                            if self._modules[index] is None:
                                self._take(index, states[int(layer.rsplit(".", 1)[1])])
                del output
            finally:
                self._transform = self._sink = self._layout = None
            results, self._results = self._results, []
            for layer, calls in zip(self._layers, self._calls, strict=True):
                if calls > 1:
                    self.repeated_calls[layer] = max(calls, self.repeated_calls.get(layer, 0))
            missing = [layer for layer, calls in zip(self._layers, self._calls, strict=True) if calls == 0]
            if missing:
                raise never_ran_error(
                    missing,
                    self.name,
                    "select modules that run in forward() (containers such as nn.ModuleList never run themselves).",
                )
            return results


def _token_modes(
    tokens: str | Mapping[str, str | None] | None, layers: Sequence[str], reductions: Sequence[Any]
) -> list[str | None]:
    """Per layer, the checked ``tokens=`` mode; ``"all"`` must cover every layer (the Grams of one batch
    share their rows), and a layer takes ``tokens=`` or ``reduce=``, not both."""
    keyed = isinstance(tokens, Mapping)
    modes = [
        token_math.check_token_mode(mode, f"tokens[{layer!r}]" if keyed else "tokens")
        for layer, mode in zip(layers, per_layer(tokens, layers, "tokens"), strict=True)
    ]
    if "all" in modes and set(modes) != {"all"}:
        raise ValueError(
            f"tokens='all' makes every real token an example, so it must apply to every selected layer (the Grams "
            f"of a batch share their rows); got {dict(zip(layers, modes, strict=True))}. Compare the per-sequence "
            f"modes ('mean', 'first', 'last') in a separate run."
        )
    both = [layer for layer, mode, r in zip(layers, modes, reductions, strict=True) if mode and r is not None]
    if both:
        raise ValueError(
            f"layer(s) {both} have both tokens= and reduce=; tokens= already turns (batch, tokens, ...) into "
            f"examples. Give one of them per layer ({{layer: ...}} dicts)."
        )
    return modes


# The comparer's adapter for plain nn.Modules (found lazily by cka.compare): select_layers, wrap, check_options.


def wrap(model: nn.Module, layers: Any = None, **options: Any) -> TorchModel:
    """A plain ``nn.Module`` given to :class:`cka.CKA` as a :class:`TorchModel` with ``CKA``'s options."""
    return TorchModel(model, layers, **options)


#: Checks ``CKA(output=..., reduce=...)`` per-layer dicts against both sides' selections.
check_options = check_per_layer_options
