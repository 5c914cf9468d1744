"""Helpers every frontend shares: layer selection, batch to model inputs, Gram stacks, the torch run lifecycle.

One wording for every frontend's errors about layer names (unknown, duplicate, never ran, close
matches: :func:`select_names`, :func:`never_ran_error`), one rule for turning a batch into model
inputs (:func:`default_inputs`), one preallocated Gram stack filled in place (:class:`GramStack`),
and one context manager for running a PyTorch module without side effects (:func:`torch_inference`:
eval mode, ``torch.inference_mode``, device, hooks, all restored even when the run raises).

No framework is imported at module level: the torch helpers import torch inside the function, so
ONNX-only and JAX-only comparisons never need it. Frontends import from here, never from each other.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from cka._stacks import GramShapeError

__all__ = [
    "GramShapeError",
    "GramStack",
    "call_arguments",
    "check_per_layer_options",
    "close_matches",
    "core_gram_settings",
    "default_inputs",
    "describe_spec",
    "first_tensor",
    "is_pattern",
    "module_device",
    "never_ran_error",
    "per_layer",
    "reduce_features",
    "select_names",
    "to_device",
    "torch_inference",
]

_GLOB_CHARACTERS = frozenset("*?[")


def describe_spec(spec: Any) -> str:
    """A selection entry as error messages show it: ``'name'``, a type's name, a function's name."""
    if isinstance(spec, type):
        return spec.__name__
    if isinstance(spec, str):
        return repr(spec)
    return getattr(spec, "__name__", repr(spec))


def close_matches(name: str, names: Sequence[str]) -> str:
    """``"close matches: [...]"`` for ``name`` among ``names`` (or some of the names when none is close)."""
    matches = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    if not matches:  # module paths: also try the last component, e.g. "conv" -> "layer1.0.conv1"
        tail = name.rsplit(".", 1)[-1]
        matches = [n for n in names if n.rsplit(".", 1)[-1].startswith(tail)][:5]
    return f"close matches: {matches}" if matches else f"no close matches; some names: {list(names[:8])}"


def call_arguments(value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Model inputs as ``(args, kwargs)``: a tensor is one positional argument, a mapping keyword
    arguments (as Hugging Face models expect), a tuple or list positional arguments."""
    if isinstance(value, Mapping):
        return (), dict(value)
    if isinstance(value, (tuple, list)):
        return tuple(value), {}
    return (value,), {}


def default_inputs(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Model inputs from a batch: a tensor is the input itself (never unpacked along the batch
    axis); a dict is passed as keyword arguments; a tuple or list is ``(inputs, targets, ...)``, and
    its first element is the input (a tensor, or a dict of keyword arguments)."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError("got an empty tuple/list as a batch; expected (inputs, targets, ...).")
        first = batch[0]
        return ((), dict(first)) if isinstance(first, Mapping) else ((first,), {})
    return call_arguments(batch)


def to_device(value: Any, device: Any) -> Any:
    """Move every tensor inside nested tuples, lists and dicts to ``device`` (asynchronously)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a NamedTuple
        return type(value)(*(to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    return value


def first_tensor(output: Any) -> Any:
    """The first tensor in a module output, depth first: the tensor itself, or the first one inside
    a tuple, list, dict or Hugging Face ``ModelOutput`` (a dict of its non-``None`` fields in
    declaration order, so ``last_hidden_state`` or ``logits``). ``None`` if there is none."""
    import torch

    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        values: Iterable[Any] = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return None
    for value in values:
        found = first_tensor(value)
        if found is not None:
            return found
    return None


def module_device(module: Any) -> Any:
    """The device of a module's first parameter (or buffer); CPU for a module without either."""
    import torch

    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def check_per_layer_options(options: Mapping[str, Any], layers: Sequence[str]) -> None:
    """Per-layer ``output``/``reduce``/``tokens`` dicts given to :class:`cka.CKA` may only name layers
    selected on either side (``layers``: both sides' selections)."""
    for key in ("output", "reduce", "tokens"):
        value = options.get(key)
        if isinstance(value, Mapping):
            unknown = [k for k in value if k not in layers]
            if unknown:
                raise ValueError(
                    f"{key} names layer(s) {unknown} that are not selected on either side; "
                    f"{close_matches(str(unknown[0]), list(dict.fromkeys(layers)))}."
                )


def per_layer(value: Any, layers: Sequence[str], what: str) -> list[Any]:
    """A setting given once for all layers, or as ``{layer name: setting}`` (others get None)."""
    if not isinstance(value, Mapping):
        return [value] * len(layers)
    unknown = [k for k in value if k not in layers]
    if unknown:
        raise ValueError(
            f"{what} names layer(s) {unknown} that are not selected; {close_matches(str(unknown[0]), layers)}."
        )
    return [value.get(name) for name in layers]


@functools.cache
def _einops() -> tuple[Callable[..., Any], type[Exception]]:
    from einops import EinopsError, reduce

    return reduce, EinopsError


def reduce_features(tensor: Any, pattern: str, layer: str) -> Any:
    """``einops.reduce(tensor, pattern, "mean")`` with the layer and shape in any error."""
    reduce, einops_error = _einops()
    try:
        return reduce(tensor, pattern, "mean")
    except einops_error as error:  # re-raise at the boundary with context
        raise ValueError(
            f"layer {layer!r}: reduce pattern {pattern!r} does not fit its output of shape "
            f"{tuple(tensor.shape)}: {error}"
        ) from None


# --------------------------------------------------------------------------------------------
# Layer selection: one wording for every frontend
# --------------------------------------------------------------------------------------------


def is_pattern(spec: Any) -> bool:
    """Whether a selection entry is a glob pattern (a str holding ``*``, ``?`` or ``[``)."""
    return isinstance(spec, str) and not _GLOB_CHARACTERS.isdisjoint(spec)


def _name_predicate(spec: Any, names: Sequence[str]) -> list[str] | None:
    """The default matcher for non-str entries: a callable ``name -> bool``."""
    return [n for n in names if spec(n)] if callable(spec) else None


def select_names(
    available: Sequence[str],
    layers: Any,
    *,
    what: str = "layers",
    owner: str = "the model",
    match: Callable[[Any, Sequence[str]], list[str] | None] | None = None,
    accepted: str = "a layer name or glob pattern (str) or a callable name -> bool",
    listing: str = "",
) -> list[str]:
    """Resolve a layer selection against the names a model offers, with one wording for every frontend.

    Parameters
    ----------
    available : sequence of str
        Every selectable name, in the model's order (``named_modules()``, capture order, graph order).
    layers : None, str, callable, or a sequence of them
        ``None``: every available name. A ``str`` is an exact name or, if it holds ``*?[``, a glob
        pattern (``"layer*.conv?"``); anything else goes to ``match``. In a sequence, rows follow the
        sequence and each pattern expands in ``available`` order.
    what : str
        How the argument is called in errors (``"model1_layers"``).
    owner : str
        The model's name in errors (``"ResidualCNN"``).
    match : callable ``(spec, available) -> list of names or None``, optional
        Resolves a non-str entry; ``None`` means "not a valid entry" (a TypeError naming ``accepted``).
        Default: a callable ``name -> bool``. The torch frontend adds module types and
        ``(name, module)`` predicates.
    accepted : str
        What an entry may be, for the TypeError.
    listing : str
        A sentence telling how to list the names (appended to the unknown-name error).

    Returns
    -------
    list of str
        Unique names, in row order.

    Raises
    ------
    ValueError
        An unknown name (with close matches), an entry that selects nothing, a layer selected twice,
        or an empty selection.
    TypeError
        An entry ``match`` does not accept.
    """
    names = list(available)
    if layers is None:
        if not names:
            raise ValueError(f"{what}: {owner} has no layers to select.{' ' + listing if listing else ''}")
        return names
    if isinstance(layers, (str, type)) or callable(layers):
        layers = [layers]
    known = set(names)
    chosen: dict[str, Any] = {}
    for spec in layers:
        if isinstance(spec, str) and not is_pattern(spec):
            if spec not in known:
                raise ValueError(
                    f"{what}: {owner} has no layer named {spec!r}; {close_matches(spec, names)}."
                    f"{' ' + listing if listing else ''}"
                )
            matched = [spec]
        elif isinstance(spec, str):
            matched = [n for n in names if n and fnmatch.fnmatchcase(n, spec)]
        else:
            found = (match or _name_predicate)(spec, names)
            if found is None:
                raise TypeError(f"{what}: each entry must be {accepted}; got {type(spec).__name__} {spec!r}.")
            matched = found
        if not matched:
            hint = close_matches(spec, names) if isinstance(spec, str) else f"some names: {[n for n in names if n][:8]}"
            raise ValueError(f"{what}: {describe_spec(spec)} selects no layer of {owner}; {hint}.")
        for name in matched:
            if name in chosen:
                raise ValueError(
                    f"{what}: layer {name!r} is selected twice (by {describe_spec(chosen[name])} and "
                    f"{describe_spec(spec)}); each layer may appear once. Remove the duplicate."
                )
            chosen[name] = spec
    if not chosen:
        raise ValueError(f"{what} is empty: select at least one layer, or pass None for the default.")
    return list(chosen)


def never_ran_error(missing: Sequence[str], owner: str, hint: str) -> RuntimeError:
    """The error for selected layers that produced nothing in a forward pass (raise it)."""
    return RuntimeError(
        f"selected layer(s) {list(missing)} of {owner} never ran in the forward pass, so there is nothing "
        f"to compare; {hint}"
    )


# --------------------------------------------------------------------------------------------
# Grams: the core Gram's settings, and one preallocated stack per side
# --------------------------------------------------------------------------------------------


def core_gram_settings(gram_fn: Callable[..., Any]) -> dict[str, Any] | None:
    """``{"kernel", "sigma", "sigma_frac", "gram_precision"}`` if ``gram_fn`` is ``functools.partial(cka.core.gram, ...)``
    with keyword settings only (what :class:`cka.CKA` hands to extractors), else ``None``: an
    extractor may then compute the same Gram its own way (inside a jitted program)."""
    from cka import core

    if not (isinstance(gram_fn, functools.partial) and gram_fn.func is core.gram and not gram_fn.args):
        return None
    keywords = dict(gram_fn.keywords)
    keywords.pop("check", None)
    settings: dict[str, Any] = {"kernel": "linear", "sigma": None, "sigma_frac": 0.8, "gram_precision": "highest"}
    if set(keywords) - set(settings):
        return None
    settings.update(keywords)
    core._check_kernel(settings["kernel"])
    core._check_precision(settings["gram_precision"])
    return settings


class GramStack:
    """One ``(L, n, n)`` stack of Grams per extractor, preallocated and filled in place as layers run.

    The storage is allocated at the first Gram of a batch (when ``n``, the dtype and the device are
    known) and reused by later batches (a smaller last batch uses a prefix of it), so a comparison
    holds exactly one stack per side: ``L n^2`` float64 numbers, with no list of Grams beside it and no
    stacked copy. Works for torch tensors (any device) and numpy arrays; :meth:`result` is valid until
    the next :meth:`start`.
    """

    def __init__(self, layers: Sequence[str]) -> None:
        self.layers = list(layers)
        self._storage: Any = None
        self._key: tuple[Any, ...] = ()
        self._view: Any = None
        self._first = 0

    def start(self) -> None:
        """Begin a batch: the next :meth:`put` fixes ``n``."""
        self._view = None

    def put(self, index: int, gram: Any) -> None:
        """Write layer ``index``'s ``(n, n)`` Gram into its slot (a copy into the preallocated stack)."""
        shape = tuple(gram.shape)
        if self._view is None:
            if len(shape) != 2 or shape[0] != shape[1]:
                raise GramShapeError(self.layers[index], shape, self.layers[index], shape[0] if shape else 0)
            self._view, self._first = self._allocate(shape[0], gram), index
        elif shape != tuple(self._view.shape[1:]):
            raise GramShapeError(self.layers[index], shape, self.layers[self._first], self._view.shape[-1])
        self._view[index] = gram

    def result(self) -> Any:
        """The filled ``(L, n, n)`` stack (None before the first :meth:`put`)."""
        return self._view

    def release(self) -> None:
        """Free the storage (at the end of a comparison)."""
        self._storage = self._view = None

    def _allocate(self, n: int, like: Any) -> Any:
        size = len(self.layers) * n * n
        torch = sys.modules.get("torch")
        is_torch = torch is not None and isinstance(like, torch.Tensor)
        key = (is_torch, like.dtype, like.device if is_torch else None)
        if self._storage is None or self._key != key or self._storage.shape[0] < size:
            self._storage = None  # free the old storage before allocating the new one
            if torch is not None and is_torch:
                self._storage = torch.empty(size, dtype=like.dtype, device=like.device)
            else:
                import numpy

                self._storage = numpy.empty(size, dtype=like.dtype)
            self._key = key
        return self._storage[:size].reshape(len(self.layers), n, n)


# --------------------------------------------------------------------------------------------
# Running a PyTorch module without side effects
# --------------------------------------------------------------------------------------------


def _restore_training(training: Mapping[Any, bool]) -> None:
    for module, flag in training.items():
        module.training = flag


@contextlib.contextmanager
def torch_inference(
    module: Any,
    *,
    device: Any = None,
    hooks: Iterable[tuple[Any, Callable[..., Any]]] = (),
    pre_hooks: Iterable[tuple[Any, Callable[..., Any]]] = (),
    name: str | None = None,
) -> Iterator[Callable[..., Any]]:
    """Run a PyTorch module for its features, leaving it exactly as it was found.

    On entry: every submodule's training flag is recorded, the module moves to ``device`` (if given
    and elsewhere), the forward ``hooks`` and ``pre_hooks`` (``register_forward_pre_hook(...,
    with_kwargs=True)``) are registered, and the module is put in eval mode. Yields
    ``forward(*args, **kwargs)``, which calls the module under ``torch.inference_mode()`` (no
    autograd graph, outputs are inference tensors). On exit, also when the run raised: hooks
    removed, device and every training flag restored.

    Parameters
    ----------
    module : nn.Module
    device : torch.device or str, optional
        Where to run; the module must then sit on one device (a module spread over several is left
        where it is only with ``device=None``).
    hooks, pre_hooks : iterable of (submodule, hook)
    name : str, optional
        The model's name in errors.
    """
    import torch

    with contextlib.ExitStack() as stack:
        training = {m: m.training for m in module.modules()}
        stack.callback(_restore_training, training)
        if device is not None:
            device = torch.device(device)
            devices = {t.device for t in (*module.parameters(), *module.buffers())}
            if len(devices) > 1:
                raise ValueError(
                    f"{name or type(module).__name__} spans devices {sorted(map(str, devices))}; pass device=None "
                    f"to leave it where it is (inputs then go to its first parameter's device)."
                )
            original = devices.pop() if devices else device
            if original != device:
                module.to(device)
                stack.callback(module.to, original)
        for submodule, hook in hooks:
            stack.callback(submodule.register_forward_hook(hook).remove)
        for submodule, hook in pre_hooks:
            stack.callback(submodule.register_forward_pre_hook(hook, with_kwargs=True).remove)
        module.eval()

        def forward(*args: Any, **kwargs: Any) -> Any:
            with torch.inference_mode():
                return module(*args, **kwargs)

        yield forward
