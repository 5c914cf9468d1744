r"""PyTorch frontend: compare two ``nn.Module``\ s layer by layer, a drop-in for ``torch_cka.CKA``.

>>> from cka import CKA
>>> cka = CKA(model1, model2, model1_name="ResNet18", model2_name="ResNet34", device="cuda")  # doctest: +SKIP
>>> result = cka.compare(dataloader)       # one iteration of the loader feeds both models  # doctest: +SKIP
>>> cka.export()["CKA"].shape, result.matrix.shape                                          # doctest: +SKIP

How it computes (DESIGN.md): a forward hook on each selected module turns the module's output into
its ``(n, n)`` float64 Gram at once (first tensor of the output, optional einops reduction, features
centred, Gram product in the feature dtype), so no layer's feature map outlives its hook: peak extra
memory is ``O((L1 + L2) n^2)`` whatever the feature size. Per batch all ``L1 x L2`` HSIC values come
from one matrix product (:func:`cka.state.update_state_from_grams`), accumulated in float64 on the
device. Nothing is read back to the host until the end: NaN/Inf is tracked per layer on the device
(first bad batch index) and reported after the loop.

Layer selection (:func:`select_layers`): exact module names (as in ``model.named_modules()``), glob
patterns (``"layer*.conv?"``), module types (``nn.Conv2d``), callables ``(name, module) -> bool``, or
a list mixing them; rows follow the list, a pattern/type/callable expands in ``named_modules()``
order. The default (:func:`default_layers`) is the outputs of the model's repeated blocks.

A module that runs more than once per forward pass (a shared ``nn.ReLU``, weight-tied layers):
**its first call is recorded**, later calls are ignored (they cost nothing), and a
:class:`LayerCalledTwiceWarning` names the layer after the run. Select a module that runs once (for
a torchvision ``BasicBlock`` the block itself rather than its shared ``relu``) to compare a later call.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from cka import core
from cka import state as engine
from cka.frontends._common import (
    call_arguments,
    close_matches,
    default_inputs,
    describe_spec,
    first_tensor,
    module_device,
    per_layer,
    reduce_features,
    to_device,
)
from cka.frontends.base import FeatureExtractor
from cka.result import CKAResult

__all__ = [
    "CKA",
    "LayerCalledTwiceWarning",
    "LinearGram",
    "TorchModel",
    "call_arguments",
    "default_inputs",
    "default_layers",
    "first_tensor",
    "select_layers",
]

#: One entry of a layer selection: an exact name or glob pattern, a module type, or a predicate.
LayerSpec = Union[str, type, Callable[[str, nn.Module], bool]]
#: Picks the tensor to compare from a module's output: index, key, or a function of the output.
OutputSelector = Union[int, str, Callable[[Any], torch.Tensor]]

_GLOB_CHARACTERS = set("*?[")
#: Leaf modules the default selection skips: the identity in eval mode, so they duplicate a neighbour.
_SKIPPED_LEAVES = (
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
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
            if container and composite(child) and not stage(child) and not isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                blocks.append(full)
            else:
                visit(full, child)

    visit("", model)
    if blocks:
        return blocks
    leaves = [
        name for name, m in model.named_modules()
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
        or callable expands in ``named_modules()`` order.
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
        layer selected twice, or an empty selection.
    TypeError
        An entry of another type.
    """
    if layers is None:
        return default_layers(model)
    if isinstance(layers, (str, type)) or callable(layers):
        layers = [layers]
    modules = dict(model.named_modules(remove_duplicate=False))
    names = list(modules)
    chosen: dict[str, Any] = {}

    def add(name: str, spec: Any) -> None:
        if name in chosen:
            raise ValueError(
                f"{what}: layer {name!r} is selected twice (by {describe_spec(chosen[name])} and "
                f"{describe_spec(spec)}); each layer may appear once. Remove the duplicate."
            )
        chosen[name] = spec

    for spec in layers:
        if isinstance(spec, str) and not (_GLOB_CHARACTERS & set(spec)):
            if spec not in modules:
                raise ValueError(
                    f"{what}: {type(model).__name__} has no module named {spec!r}; {close_matches(spec, names)}. "
                    f"List the names with [n for n, _ in model.named_modules()]."
                )
            add(spec, spec)
            continue
        if isinstance(spec, str):
            matched = [n for n in names if n and fnmatch.fnmatchcase(n, spec)]
        elif isinstance(spec, type) and issubclass(spec, nn.Module):
            matched = [n for n in names if isinstance(modules[n], spec)]
        elif callable(spec) and not isinstance(spec, nn.Module):
            matched = [n for n in names if spec(n, modules[n])]
        else:
            raise TypeError(
                f"{what}: each entry must be a module name or glob pattern (str), an nn.Module type or a "
                f"callable (name, module) -> bool; got {type(spec).__name__} {spec!r}."
            )
        if not matched:
            hint = close_matches(spec, names) if isinstance(spec, str) else f"some names: {names[1:9]}"
            raise ValueError(f"{what}: {describe_spec(spec)} selects no module of {type(model).__name__}; {hint}.")
        for name in matched:
            add(name, spec)
    if not chosen:
        raise ValueError(f"{what} is empty: select at least one layer, or pass None for the default.")
    return list(chosen)


# --------------------------------------------------------------------------------------------
# Outputs and batches
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

    While entered (``with``), forward hooks are registered and the module is in eval mode; leaving
    removes the hooks and restores each submodule's training flag and the module's device, also
    when the run raised. :meth:`grams` and :meth:`features` enter by themselves when called outside.
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
            raise TypeError(f"reduce must be an einops pattern (str) or a dict layer -> pattern; got {type(reduce).__name__}.")
        self.module = module
        self.name = name if name is not None else repr(module).split("(")[0]
        self._layers = select_layers(module, layers, what=what)
        named = dict(module.named_modules(remove_duplicate=False))
        self._modules = [named[layer] for layer in self._layers]
        self._outputs = per_layer(output, self._layers, "output")
        self._reductions = per_layer(reduce, self._layers, "reduce")
        self._inputs = inputs
        self.device = torch.device(device) if device is not None else None
        self._entered = 0
        self._exit_stack: ExitStack | None = None
        self._transform: Callable[[torch.Tensor], Any] | None = None
        self._results: list[Any] = []
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
        return f"torch:{type(self.module).__name__}:{digest.hexdigest()[:32]}:{','.join(self.layer_names())}"

    def layer_names(self) -> list[str]:
        return list(self._layers)

    def grams(self, batch: Any, gram_fn: Callable[[Any], Any]) -> list[torch.Tensor]:
        """One ``(n, n)`` Gram per selected layer, each computed inside the layer's forward hook."""
        return self._run(batch, gram_fn)

    def features(self, batch: Any) -> dict[str, torch.Tensor]:
        """Selected (and reduced) outputs of each layer for ``batch``, as inference tensors."""
        return dict(zip(self._layers, self._run(batch, lambda t: t)))

    @property
    def inputs(self) -> Callable[[Any], Any] | None:
        """The user's ``batch -> model inputs`` hook (None: :func:`default_inputs`); other frontends
        that run this module as a reference (ONNX) call it the same way."""
        return self._inputs

    def input_device(self) -> torch.device:
        """Where this module's inputs go: ``device`` if given, else the module's first parameter's."""
        return self.device if self.device is not None else module_device(self.module)

    # -- Set-up and tear-down ------------------------------------------------------------------

    def __enter__(self) -> "TorchModel":
        self._entered += 1
        if self._entered > 1:
            return self
        with ExitStack() as stack:
            training = {m: m.training for m in self.module.modules()}
            stack.callback(_restore_training, training)
            if self.device is not None:
                devices = {t.device for t in (*self.module.parameters(), *self.module.buffers())}
                if len(devices) > 1:
                    raise ValueError(
                        f"{self.name} spans devices {sorted(map(str, devices))}; pass device=None to leave it "
                        f"where it is (inputs then go to its first parameter's device)."
                    )
                original = devices.pop() if devices else self.device
                if original != self.device:
                    self.module.to(self.device)
                    stack.callback(self.module.to, original)
            for index, module in enumerate(self._modules):
                stack.callback(module.register_forward_hook(self._make_hook(index)).remove)
            self.module.eval()
            self._exit_stack = stack.pop_all()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._entered -= 1
        if self._entered == 0 and self._exit_stack is not None:
            stack, self._exit_stack = self._exit_stack, None
            self._transform = None
            self._results = []
            stack.close()

    # -- Internals -----------------------------------------------------------------------------

    def _make_hook(self, index: int) -> Callable[[nn.Module, Any, Any], None]:
        layer, selector, pattern = self._layers[index], self._outputs[index], self._reductions[index]

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._transform is None:  # the model ran outside one of our passes
                return
            self._calls[index] += 1
            if self._results[index] is not None:  # a second call in this pass: the first is kept
                return
            tensor = _select_output(output, selector, layer)
            if pattern is not None:
                tensor = reduce_features(tensor, pattern, layer)
            if tensor.dim() == 0:
                raise ValueError(f"layer {layer!r} produced a scalar; CKA needs one feature vector per example.")
            self._results[index] = self._transform(tensor)

        return hook

    def _run(self, batch: Any, transform: Callable[[torch.Tensor], Any]) -> list[Any]:
        with self:
            args, kwargs = (
                call_arguments(self._inputs(batch)) if self._inputs is not None else default_inputs(batch)
            )
            device = self.input_device()
            args, kwargs = to_device(args, device), to_device(kwargs, device)
            self._results = [None] * len(self._layers)
            self._calls = [0] * len(self._layers)
            self._transform = transform
            try:
                with torch.inference_mode():
                    self.module(*args, **kwargs)
            finally:
                self._transform = None
            results, self._results = self._results, []
            for layer, calls in zip(self._layers, self._calls):
                if calls > 1:
                    self.repeated_calls[layer] = max(calls, self.repeated_calls.get(layer, 0))
            missing = [layer for layer, r in zip(self._layers, results) if r is None]
            if missing:
                raise RuntimeError(
                    f"selected layer(s) {missing} of {self.name} never ran in the forward pass, so there is "
                    f"nothing to compare; select modules that run in forward() (containers such as "
                    f"nn.ModuleList never run themselves)."
                )
            return results


def _restore_training(training: Mapping[nn.Module, bool]) -> None:
    for module, flag in training.items():
        module.training = flag


# --------------------------------------------------------------------------------------------
# The Gram inside the hook
# --------------------------------------------------------------------------------------------


class LinearGram:
    r"""The linear-kernel Gram of one layer's output, as :func:`cka.core.gram` computes it, for hooks.

    Same math and numerics as ``cka.core.gram(x, kernel="linear", check=False)`` (DESIGN.md):
    features flattened to ``(n, d)`` and centred per batch, the product :math:`\bar X \bar X^\top`
    in the feature dtype (at least float32), the result in float64, and the Gram of a constant layer
    (:math:`\lVert \bar X\rVert^2 \le (\text{CONSTANT\_ULPS}\,\epsilon)^2 \lVert X\rVert^2`) zeroed so
    its CKA is NaN. Two things make it cheaper inside a forward pass, where it runs once per layer
    per batch, the mean is one matrix-vector product and the centred copy goes into a buffer reused across layers and batches: a fresh
    feature-sized allocation per layer costs page faults on CPU (measured on a 128 x 65536 post-ReLU
    layer, 2 cores: the centring took 55 ms into a new tensor, 13 ms into the buffer, beside a
    50 ms product). The buffer holds at most one feature map and is released with the comparison.
    The constant-layer test reads both norms off the Gram, as the core does:
    :math:`\lVert \bar X\rVert^2 = \operatorname{tr} \bar X\bar X^\top` and
    :math:`\lVert X\rVert^2 = \operatorname{tr}\bar X\bar X^\top + n\lVert\mu\rVert^2`.

    Non-torch arrays go to :func:`cka.core.gram`.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def __call__(self, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return core.gram(x, check=False)
        features = x.reshape(x.shape[0], -1)
        accumulate = torch.float32 if x.device.type == "mps" else torch.float64
        dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else accumulate
        features = features.to(dtype)
        # the mean as a (1, n) @ (n, d) product: 10x faster than mean(dim=0) on CPU (24 ms vs 2 ms for
        # 128 x 65536). Any per-feature shift leaves every HSIC estimator exactly unchanged, so the
        # rounding of the mean costs no accuracy; centring is only there to keep the product precise.
        weights = torch.full((1, features.shape[0]), 1.0 / features.shape[0], dtype=dtype, device=x.device)
        mean = torch.mm(weights, features)
        centred = self._buffer(features.numel(), dtype, x.device).view(features.shape)
        torch.sub(features, mean, out=centred)
        gram = torch.mm(centred, centred.T).to(accumulate)
        centred_sq = gram.diagonal().sum()
        raw_sq = centred_sq + features.shape[0] * mean.to(accumulate).square().sum()
        constant = centred_sq <= (core.CONSTANT_ULPS * torch.finfo(dtype).eps) ** 2 * raw_sq
        return gram.masked_fill(constant, 0.0)

    def _buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buffer = self._buffers.get((dtype, device))
        if buffer is None or buffer.numel() < numel:
            self._buffers.pop((dtype, device), None)  # free the old one before allocating
            buffer = self._buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel]


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------


class _Side:
    """One side of a comparison: an extractor and the indices of this side's layers in its output
    (the two sides share one extractor when they hook the same model)."""

    def __init__(self, extractor: FeatureExtractor, layers: list[str], indices: list[int]) -> None:
        self.extractor, self.layers, self.indices = extractor, layers, indices


class CKA:
    """Minibatch CKA between every selected layer of two models; the API of ``torch_cka.CKA``.

    Parameters
    ----------
    model1, model2 : nn.Module or FeatureExtractor
        The models; the same object twice compares a model with itself (one forward pass per
        batch serves both sides). Any :class:`~cka.frontends.base.FeatureExtractor` (an ONNX graph,
        a JAX function) works too; its Grams are moved to the comparison device.
    model1_name, model2_name : str, optional
        Display names; default the class name.
    model1_layers, model2_layers : selection, optional
        See :func:`select_layers`; default :func:`default_layers`. For a FeatureExtractor the
        selection is handed to its :meth:`~cka.frontends.base.FeatureExtractor.bind`.
    device : str or torch.device, optional
        Move the modules there for the run (restored afterwards) and accumulate there. Default
        (``None``): modules stay where they are, inputs go to each module's device, and the
        accumulators live on model1's device.
    kernel : {"linear", "rbf"}
    unbiased : bool
        Unbiased HSIC per batch (Nguyen et al. 2021; default) or the biased estimator.
    sigma, sigma_frac : float
        RBF bandwidth (see :func:`cka.core.rbf_kernel`).
    inputs, output, reduce
        As in :class:`TorchModel`, for both sides (wrap a model in ``TorchModel`` yourself to set
        them per side).
    progress : bool
        Show a tqdm progress bar.

    Examples
    --------
    >>> cka = CKA(resnet18, resnet34, model1_name="ResNet18", model2_name="ResNet34")  # doctest: +SKIP
    >>> result = cka.compare(loader)            # CKAResult; also kept for export()   # doctest: +SKIP
    >>> result.save("r18_vs_r34.json"); cka.plot_results(save_path="r18_vs_r34.png")  # doctest: +SKIP
    """

    def __init__(
        self,
        model1: nn.Module | FeatureExtractor,
        model2: nn.Module | FeatureExtractor,
        model1_name: str | None = None,
        model2_name: str | None = None,
        model1_layers: Any = None,
        model2_layers: Any = None,
        device: str | torch.device | None = None,
        *,
        kernel: str = "linear",
        unbiased: bool = True,
        sigma: float | None = None,
        sigma_frac: float = 0.8,
        inputs: Callable[[Any], Any] | None = None,
        output: Any = None,
        reduce: str | Mapping[str, str] | None = None,
        progress: bool = True,
    ) -> None:
        core._check_kernel(kernel)
        self.device = torch.device(device) if device is not None else None
        self.kernel, self.unbiased, self.sigma, self.sigma_frac = kernel, bool(unbiased), sigma, sigma_frac
        self.progress = progress
        options = {"output": output, "reduce": reduce, "inputs": inputs, "device": self.device}
        self.model1, self.model2 = model1, model2
        selected = {  # resolved up front, so that per-layer settings can be split between the sides
            what: select_layers(model, layers, what=f"{what}_layers") if isinstance(model, nn.Module) else []
            for what, model, layers in (("model1", model1, model1_layers), ("model2", model2, model2_layers))
        }
        _check_per_layer_keys(options, selected["model1"] + selected["model2"])

        if model1 is model2 and isinstance(model1, nn.Module):
            # The same module on both sides: one extractor hooks the union of both selections, so a
            # layer hooked for both sides is computed once, and one forward pass serves both.
            layers1, layers2 = selected["model1"], selected["model2"]
            union = list(dict.fromkeys(layers1 + layers2))
            shared = TorchModel(model1, union, name=model1_name, **_restrict(options, union))
            self._side1 = _Side(shared, layers1, [union.index(n) for n in layers1])
            self._side2 = _Side(shared, layers2, [union.index(n) for n in layers2])
        else:
            self._side1 = self._make_side(model1, selected["model1"], model1_name, "model1", options)
            self._side2 = self._make_side(model2, selected["model2"], model2_name, "model2", options)
        self._bind(model1_layers, model2_layers)
        self.model1_name = model1_name if model1_name is not None else self._side1.extractor.name
        self.model2_name = model2_name if model2_name is not None else self._side2.extractor.name
        self.result: CKAResult | None = None
        self.hsic_matrix: torch.Tensor | None = None
        self._datasets = ("", "")

    @staticmethod
    def _make_side(model: Any, layers: Any, name: str | None, what: str, options: dict[str, Any]) -> _Side:
        if isinstance(model, FeatureExtractor):
            if name is not None:
                model.name = name
            return _Side(model, [], [])  # layers filled in by _bind
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{what} must be a torch.nn.Module or a cka FeatureExtractor (e.g. cka.frontends.onnx.OnnxModel); "
                f"got {type(model).__module__}.{type(model).__qualname__}."
            )
        extractor = TorchModel(model, layers, name=name, what=f"{what}_layers", **_restrict(options, layers))
        names = extractor.layer_names()
        return _Side(extractor, names, list(range(len(names))))

    def _bind(self, model1_layers: Any, model2_layers: Any) -> None:
        """Hand each non-torch extractor its layer selection and the other side (see
        :meth:`FeatureExtractor.bind`), then read the final layer names."""
        sides = ((self._side1, self._side2, model1_layers), (self._side2, self._side1, model2_layers))
        for side, other, layers in sides:
            if not isinstance(side.extractor, TorchModel):
                side.extractor.bind(layers=layers, other=other.extractor)
                side.layers = list(side.extractor.layer_names())
                side.indices = list(range(len(side.layers)))
                duplicates = sorted({n for n in side.layers if side.layers.count(n) > 1})
                if duplicates:
                    raise ValueError(f"{side.extractor.name} selects layers {duplicates} more than once; each may appear once.")

    # -- torch_cka's API -----------------------------------------------------------------------

    def compare(
        self,
        dataloader1: Iterable[Any],
        dataloader2: Iterable[Any] | None = None,
        *,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
    ) -> CKAResult:
        """Accumulate minibatch CKA over the batches of ``dataloader1`` (and ``dataloader2``).

        Parameters
        ----------
        dataloader1 : iterable of batches
            A ``DataLoader`` or any iterable of tensors, ``(inputs, targets, ...)`` tuples or dicts.
        dataloader2 : iterable of batches, optional
            If given, model2 sees these batches (paired with dataloader1's in order: the same number
            of batches and of examples per batch). If not, **one** iteration of dataloader1 feeds
            both models (so a shuffling loader still pairs the examples).
        checkpoint : path, optional
            Save the accumulator state and the position there every ``checkpoint_every`` batches and at
            the end (atomically: a temporary file renamed over the old one). If the file exists, the run
            resumes from it: the first batches already counted are drawn from the loaders but not run
            through the models, and the result equals an uninterrupted run's. A checkpoint from other
            models, layers or settings is refused. Under ``torch.distributed`` each rank keeps its own
            file (``run.rank0-of-4.ckpt``).
        checkpoint_every : int
            Batches between two checkpoints (each one is a host synchronisation and a small write).

        Under ``torch.distributed`` (initialised process group), each rank accumulates the batches it
        is given (its ``DistributedSampler`` shard, or :func:`cka.distributed.shard_batches`) and one
        all-reduce combines the sums: every rank returns the same result, equal to one process over the
        same batches.

        Returns
        -------
        CKAResult
            Also kept as ``self.result`` for :meth:`export` and :meth:`plot_results`.

        Raises
        ------
        ValueError
            Loaders of different lengths or batch sizes (batch index named), no batch with at least
            4 examples, NaN/Inf in a layer's features (layer and first batch named).
        """
        separate = dataloader2 is not None
        if separate:
            len1, len2 = _length(dataloader1), _length(dataloader2)
            if len1 is not None and len2 is not None and len1 != len2:
                raise ValueError(
                    f"dataloader1 has {len1} batches but dataloader2 has {len2}; both must yield the same "
                    f"number of batches with the same number of examples each."
                )
        self._datasets = (_dataset_name(dataloader1), _dataset_name(dataloader2 if separate else dataloader1))
        gram_fn: Callable[[Any], Any] = (
            LinearGram() if self.kernel == "linear"
            else functools.partial(core.gram, kernel=self.kernel, sigma=self.sigma, sigma_frac=self.sigma_frac, check=False)
        )
        shared_pass = self._side1.extractor is self._side2.extractor and not separate
        accumulator = _Accumulator(len(self._side1.layers), len(self._side2.layers), self.unbiased)
        saver = _Checkpointer(checkpoint, checkpoint_every, self._fingerprint()) if checkpoint is not None else None
        start = saver.restore(accumulator) if saver is not None else 0
        extractors = list(dict.fromkeys([self._side1.extractor, self._side2.extractor]))
        for extractor in extractors:
            if isinstance(extractor, TorchModel):
                extractor.repeated_calls.clear()

        from tqdm.auto import tqdm

        with ExitStack() as stack:
            for extractor in extractors:
                stack.enter_context(extractor)
            # an iterator, not the loader: tqdm.auto calls iter() on what it gets more than once, and
            # each iter() of a DataLoader is a new epoch (new shuffle, new workers)
            bar = tqdm(iter(dataloader1), total=_length(dataloader1), desc="| Comparing features |", disable=not self.progress)
            stack.callback(bar.close)
            device = self.device
            index = -1
            for index, (batch1, batch2) in enumerate(_paired(bar, dataloader2)):
                if index < start:  # already in the restored sums
                    continue
                raw1 = self._side1.extractor.grams(batch1, gram_fn)
                raw2 = raw1 if shared_pass else self._side2.extractor.grams(batch2, gram_fn)
                device = device if device is not None else _device_of(raw1[0])
                grams1 = self._stack(self._side1, raw1, device, "model1", index)
                grams2 = self._stack(self._side2, raw2, device, "model2", index)
                if grams1.shape[-1] != grams2.shape[-1]:
                    raise ValueError(
                        f"batch {index}: model1 ({self.model1_name}) got {grams1.shape[-1]} examples but model2 "
                        f"({self.model2_name}) got {grams2.shape[-1]}; both sides must see the same examples in "
                        f"the same order (same batch size, same drop_last)."
                    )
                accumulator.add(index, grams1, grams2)
                if saver is not None:
                    saver.maybe_save(accumulator, index + 1)
            if saver is not None and index + 1 > start:
                saver.save(accumulator, index + 1)
        return self._finish(accumulator)

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match: both models (weights hashed), layers and settings."""
        from cka.distributed import rank_and_world_size

        rank, world_size = rank_and_world_size()
        return {
            "model1": self._side1.extractor.fingerprint(), "model2": self._side2.extractor.fingerprint(),
            "model1_layers": list(self._side1.layers), "model2_layers": list(self._side2.layers),
            "kernel": self.kernel, "unbiased": self.unbiased, "sigma": self.sigma, "sigma_frac": self.sigma_frac,
            "rank": rank, "world_size": world_size,
        }

    def _home_device(self) -> torch.device:
        """Where a rank that saw no batch keeps its (zero) sums for the all-reduce."""
        for side in (self._side1, self._side2):
            if isinstance(side.extractor, TorchModel):
                return module_device(side.extractor.module)
        return torch.device("cpu")

    def _stack(self, side: _Side, grams: Sequence[Any], device: torch.device, what: str, index: int) -> torch.Tensor:
        """This side's Grams as one ``(L, n, n)`` float64 tensor on ``device``."""
        if len(grams) != len(side.extractor.layer_names()):
            raise RuntimeError(
                f"{side.extractor.name} returned {len(grams)} Grams for {len(side.extractor.layer_names())} layers."
            )
        chosen = [_as_torch(grams[i], device) for i in side.indices]
        sizes = [g.shape[-1] for g in chosen]
        for layer, g in zip(side.layers, chosen):
            if g.dim() != 2 or g.shape[0] != g.shape[1] or g.shape[0] != sizes[0]:
                raise ValueError(
                    f"batch {index}: layer {layer!r} of {what} gave a Gram of shape {tuple(g.shape)} while layer "
                    f"{side.layers[0]!r} gave {sizes[0]} examples; its output's first axis is not the batch axis. "
                    f"Pick the right tensor with output= or move the batch axis first with reduce= (einops)."
                )
        return torch.stack(chosen)

    def _finish(self, accumulator: "_Accumulator") -> CKAResult:
        from cka.distributed import is_distributed

        if is_distributed():
            accumulator.all_reduce(self.device if self.device is not None else self._home_device())
        state, first_bad, skipped = accumulator.state, accumulator.first_bad, accumulator.skipped
        core.warn_skipped_batches(skipped, self.unbiased, stacklevel=3)
        if state is None:
            if skipped:
                raise ValueError(
                    f"no batch with at least {core.min_examples(self.unbiased)} examples (skipped {skipped}); "
                    f"use a larger batch size."
                )
            raise ValueError("dataloader1 yielded no batches; pass a loader with at least one batch of 4+ examples.")
        for side, bad, what in ((self._side1, first_bad[0], "model1"), (self._side2, first_bad[1], "model2")):
            bad = bad.cpu()
            if (bad >= 0).any():
                layer = int(torch.nonzero(bad >= 0)[0, 0])
                where = f"batch {int(bad[layer])}"
                if accumulator.world_size > 1:
                    where = f"batch {int(bad[layer]) // accumulator.world_size} of rank {int(bad[layer]) % accumulator.world_size}"
                raise ValueError(
                    f"layer {side.layers[layer]!r} of {what} ({getattr(self, what + '_name')}) produced NaN or Inf "
                    f"features in {where} (first seen); check the model and that batch's data."
                )
        hsic_xx, hsic_yy = state.hsic_xx.cpu(), state.hsic_yy.cpu()
        matrix = engine.finalize(state).cpu()
        self._warn_about(matrix, hsic_xx, hsic_yy)
        extractors = dict.fromkeys([self._side1.extractor, self._side2.extractor])
        repeated = {k: v for e in extractors if isinstance(e, TorchModel) for k, v in e.repeated_calls.items()}
        if repeated:
            warnings.warn(
                f"layer(s) {repeated} (name: calls per forward pass) ran more than once per forward pass; CKA uses "
                f"each one's first call. Select a module that runs once to compare a later call.",
                LayerCalledTwiceWarning,
                stacklevel=3,
            )
        settings = {
            "kernel": self.kernel,
            "unbiased": self.unbiased,
            "n_batches": int(state.n_batches.item()),
            "skipped_batches": skipped,
            "dataset1": self._datasets[0],
            "dataset2": self._datasets[1],
        }
        if self.kernel == "rbf":
            settings.update(sigma=self.sigma, sigma_frac=self.sigma_frac)
        self.hsic_matrix = matrix
        self.result = CKAResult(
            matrix.numpy(), tuple(self._side1.layers), tuple(self._side2.layers), self.model1_name,
            self.model2_name, int(state.n_examples.item()), settings,
        )
        return self.result

    def _warn_about(self, matrix: torch.Tensor, hsic_xx: torch.Tensor, hsic_yy: torch.Tensor) -> None:
        """Name constant layers (NaN rows/columns) and values beyond 1 (a numerics bug); never clip."""
        constant = [self._side1.layers[i] for i in torch.nonzero(hsic_xx <= 0).flatten().tolist()]
        constant += [self._side2.layers[j] for j in torch.nonzero(hsic_yy <= 0).flatten().tolist()]
        if constant:
            warnings.warn(
                f"CKA is NaN for layer(s) {constant}: their features are constant over the examples (zero "
                f"variance), so CKA is undefined there.",
                core.CKANumericsWarning,
                stacklevel=4,
            )
        finite = matrix[torch.isfinite(matrix)]
        if finite.numel() and float(finite.abs().max()) > 1 + 1e-6:
            warnings.warn(
                f"CKA exceeds 1 in magnitude (max {float(finite.abs().max()):.9g}); in exact arithmetic |CKA| <= 1, "
                f"so this is a numerical problem; please report it with the models.",
                core.CKANumericsWarning,
                stacklevel=4,
            )

    def export(self) -> dict[str, Any]:
        """torch_cka's export: ``{"model1_name", "model2_name", "CKA", "model1_layers", "model2_layers",
        "dataset1_name", "dataset2_name"}``; ``CKA`` is an ``(L1, L2)`` float64 CPU tensor whose rows and
        columns follow ``model1_layers`` and ``model2_layers``."""
        result = self._require_result("export")
        return {
            "model1_name": result.model1_name,
            "model2_name": result.model2_name,
            "CKA": self.hsic_matrix,
            "model1_layers": list(result.model1_layers),
            "model2_layers": list(result.model2_layers),
            "dataset1_name": self._datasets[0],
            "dataset2_name": self._datasets[1],
        }

    def plot_results(self, save_path: str | None = None, title: str | None = None) -> Any:
        """Heatmap of the last result (:meth:`CKAResult.plot`), saved to ``save_path`` if given.
        Returns the ``Axes``; never calls ``plt.show()``."""
        ax = self._require_result("plot_results").plot(title=title)
        if save_path is not None:
            ax.figure.savefig(save_path, dpi=150)
        return ax

    def _require_result(self, what: str) -> CKAResult:
        if self.result is None:
            raise RuntimeError(f"nothing to {what.replace('_', ' ')} yet: call compare(dataloader) first.")
        return self.result


_END = object()


class _Accumulator:
    """The running sums of one comparison (a :class:`cka.state.CKAState` on the device), the batches
    skipped for having too few examples, and per layer the first batch with NaN/Inf, tracked on
    the device so that no batch waits for the host."""

    def __init__(self, n_layers1: int, n_layers2: int, unbiased: bool) -> None:
        self.shape, self.unbiased = (n_layers1, n_layers2), unbiased
        self.min_n = core.min_examples(unbiased)
        self.state: engine.CKAState | None = None
        self.first_bad: list[torch.Tensor] = []  # (L1,), (L2,) int64: first bad batch or -1
        self.skipped: list[int] = []

    world_size = 1

    def all_reduce(self, device: torch.device) -> None:
        """Sum the state over all ranks (one all-reduce) and combine the NaN bookkeeping: a bad batch is
        encoded as ``local_index * world_size + rank`` and the smallest code over ranks is kept."""
        import torch.distributed as dist

        from cka.distributed import all_reduce_state, rank_and_world_size

        rank, self.world_size = rank_and_world_size()
        if self.state is None:  # a rank with no batch still takes part, with zeros
            self.state = engine.init_state(*self.shape, like=torch.zeros((), device=device))
            self.first_bad = [torch.full((size,), -1, dtype=torch.int64, device=device) for size in self.shape]
        self.state = all_reduce_state(self.state)
        never = torch.iinfo(torch.int64).max
        for k, bad in enumerate(self.first_bad):
            code = torch.where(bad >= 0, bad * self.world_size + rank, torch.full_like(bad, never))
            code = code.to(self.state.hsic_xy.device)
            dist.all_reduce(code, op=dist.ReduceOp.MIN)
            self.first_bad[k] = torch.where(code == never, torch.full_like(code, -1), code)
        if float(self.state.n_batches) == 0:
            self.state = None

    def add(self, index: int, grams1: torch.Tensor, grams2: torch.Tensor) -> None:
        """Add batch ``index`` given its Gram stacks ``(L1, n, n)`` and ``(L2, n, n)``."""
        if grams1.shape[-1] < self.min_n:
            self.skipped.append(index)
            return
        with torch.inference_mode():
            if self.state is None:
                self.state = engine.init_state(*self.shape, like=grams1)
                self.first_bad = [torch.full((g.shape[0],), -1, dtype=torch.int64, device=g.device) for g in (grams1, grams2)]
            previous = self.state
            self.state = engine.update_state_from_grams(self.state, grams1, grams2, unbiased=self.unbiased)
            # NaN/Inf anywhere in a layer's Gram reaches its self term HSIC(K, K) (see
            # cka.state._update_impl): the L1 + L2 self-term increments flag the bad layers, with no
            # extra pass over the (L, n, n) Grams
            increments = (self.state.hsic_xx - previous.hsic_xx, self.state.hsic_yy - previous.hsic_yy)
            for k, increment in enumerate(increments):
                bad = ~torch.isfinite(increment)
                self.first_bad[k] = torch.where(bad & (self.first_bad[k] < 0), index, self.first_bad[k])


class _Checkpointer:
    """Saves and restores an :class:`_Accumulator` through :mod:`cka.checkpoint` (atomic, checksummed,
    fingerprinted); one file per rank under ``torch.distributed``."""

    def __init__(self, path: str | os.PathLike, every: int, fingerprint: dict[str, Any]) -> None:
        if int(every) < 1:
            raise ValueError(f"checkpoint_every must be a positive number of batches; got {every}.")
        self.path, self.every, self.fingerprint = Path(path), int(every), fingerprint
        if fingerprint["world_size"] > 1:
            self.path = self.path.with_name(
                f"{self.path.stem}.rank{fingerprint['rank']}-of-{fingerprint['world_size']}{self.path.suffix}"
            )

    def restore(self, accumulator: "_Accumulator") -> int:
        """Load the checkpoint into ``accumulator`` if the file exists; the number of batches it holds."""
        from cka.checkpoint import load_checkpoint, state_like

        if not self.path.exists():
            return 0
        saved = load_checkpoint(self.path, fingerprint=self.fingerprint)
        accumulator.skipped = list(saved.extra.get("skipped", []))
        if saved.extra.get("started", False):
            like = torch.zeros((), device=torch.device(saved.extra["device"]))
            accumulator.state = state_like(saved.state, like)
            accumulator.first_bad = [torch.tensor(b, dtype=torch.int64, device=like.device) for b in saved.extra["first_bad"]]
        return saved.position

    def maybe_save(self, accumulator: "_Accumulator", position: int) -> None:
        if position % self.every == 0:
            self.save(accumulator, position)

    def save(self, accumulator: "_Accumulator", position: int) -> None:
        from cka.checkpoint import save_state

        started = accumulator.state is not None
        state = accumulator.state if started else engine.init_state(*accumulator.shape, like=torch.zeros(()))
        extra = {
            "skipped": accumulator.skipped,
            "started": started,
            "device": str(state.hsic_xy.device),
            "first_bad": [b.tolist() for b in accumulator.first_bad],
        }
        save_state(self.path, state, position=position, fingerprint=self.fingerprint, extra=extra)


def _paired(batches1: Iterable[Any], loader2: Iterable[Any] | None) -> Iterable[tuple[Any, Any]]:
    """``(batch1, batch2)`` pairs; without ``loader2`` each batch is paired with itself (one iteration
    of the loader feeds both sides). Loaders that end at different batches are an error."""
    if loader2 is None:
        for batch in batches1:
            yield batch, batch
        return
    batches2 = iter(loader2)
    index = 0
    for index, batch1 in enumerate(batches1, start=1):
        batch2 = next(batches2, _END)
        if batch2 is _END:
            raise ValueError(
                f"dataloader2 ended after {index - 1} batches but dataloader1 has more; both must yield the same "
                f"number of batches."
            )
        yield batch1, batch2
    if next(batches2, _END) is not _END:
        raise ValueError(
            f"dataloader2 has more batches than dataloader1 ({index}); both must yield the same number of batches."
        )


def _check_per_layer_keys(options: Mapping[str, Any], layers: Sequence[str]) -> None:
    """Per-layer ``output``/``reduce`` dicts may only name layers selected on either side."""
    for key in ("output", "reduce"):
        if isinstance(options[key], Mapping):
            unknown = [k for k in options[key] if k not in layers]
            if unknown:
                raise ValueError(
                    f"{key} names layer(s) {unknown} that are not selected on either side; "
                    f"{close_matches(str(unknown[0]), list(dict.fromkeys(layers)))}."
                )


def _restrict(options: Mapping[str, Any], layers: Sequence[str]) -> dict[str, Any]:
    """``options`` with per-layer dicts cut down to ``layers`` (one side's share)."""
    return {k: ({n: v for n, v in o.items() if n in layers} if isinstance(o, Mapping) else o) for k, o in options.items()}


def _length(loader: Any) -> int | None:
    try:
        return len(loader)
    except TypeError:
        return None


def _dataset_name(loader: Any) -> str:
    """torch_cka's dataset label: the first line of the dataset's repr (or the loader's type)."""
    dataset = getattr(loader, "dataset", None)
    return repr(dataset).split("\n")[0] if dataset is not None else type(loader).__name__


def _device_of(gram: Any) -> torch.device:
    return gram.device if isinstance(gram, torch.Tensor) else torch.device("cpu")


def _as_torch(gram: Any, device: torch.device) -> torch.Tensor:
    """A Gram from any extractor (torch on any device, numpy, JAX) as a float64 tensor on ``device``."""
    if not isinstance(gram, torch.Tensor):
        import numpy

        gram = torch.from_numpy(numpy.asarray(gram))
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    return gram.to(device=device, dtype=dtype, non_blocking=True)
