r"""JAX pipelines: a jitted streaming CKA state, and feature capture for Flax and plain JAX functions.

Streaming minibatch CKA (Nguyen et al. 2021) without leaving JAX:

>>> import jax, jax.numpy as jnp
>>> from cka.frontends import jax as ckj
>>> rng = jax.random.split(jax.random.key(0), 3)
>>> x = jax.nn.relu(jax.random.normal(rng[0], (4, 32, 16)))          # 4 batches of 32 examples
>>> y = jnp.tanh(x @ jax.random.normal(rng[1], (16, 8)))
>>> state = ckj.init(1, 1)                                          # a pytree of zeros
>>> state = ckj.update(state, [x[0]], [y[0]])                        # one batch; jitted, no host sync
>>> state = ckj.scan_update(state, [x[1:]], [y[1:]])                 # three more, in one lax.scan
>>> matrix = ckj.finalize(state)                                     # (1, 1)
>>> bool(0.0 < float(matrix[0, 0]) <= 1.0)
True

The state is a :class:`CompensatedCKAState`: the core's :class:`~cka.state.CKAState` sums plus their
rounding errors (compensated summation, Neumaier 1974 / Knuth's TwoSum), so the accumulated sums
are as exact as one rounding of the true total whatever the number of batches. With
``jax_enable_x64`` the accumulators are float64; without it they are float32 and the result
still agrees with the float64 reference to better than 1e-6 on post-ReLU features, and keeps
doing so over 10^6 batches (measured by ``benchmarks/jax_bench.py --precision``; the tests hold it
to 1e-5). Per-batch terms come from :mod:`cka.core`
(features centred per batch, one Gram per layer, all layer pairs from one matrix product); this
module adds the jit/scan plumbing, masks and compensation, not new math.

Every update takes a mask: a ragged last batch is padded to the static batch size
(:func:`pad_batch`, :func:`stack_batches`) and costs no recompilation; padded rows add nothing.
A batch with fewer than 4 valid rows (2 for the biased estimator) adds nothing either, so whole
padding batches are free (handy to give every device the same number of batches).

Several devices: each accumulates its shard of batches and :func:`psum` merges the states over a
``shard_map``/``pmap`` axis; or merge states by hand with :func:`merge`.

Feature capture: :func:`capture_linen` (``capture_intermediates`` and ``sow``), :func:`capture_nnx`
(``nnx.capture`` with method outputs and ``sow``), and :func:`flatten_intermediates` for any nested
dict of intermediates; :class:`JaxModel` wraps any of them as a
:class:`~cka.frontends.base.FeatureExtractor`, so ``cka.CKA`` compares a Flax model with a PyTorch one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cka import core
from cka._stacks import GramShapeError
from cka.frontends._common import (
    call_arguments,
    core_gram_settings,
    default_inputs,
    is_pattern,
    select_names,
)
from cka.frontends.base import FeatureExtractor
from cka.stream import (
    CompensatedCKAState,
    finalize,
    finalize_statistics,
    init,
    merge,
    pad_batch,
    psum,
    scan_update,
    stack_batches,
    to_core_state,
    update,
)

Array = Any

__all__ = [
    "CompensatedCKAState",
    "JaxModel",
    "capture_linen",
    "capture_nnx",
    "finalize",
    "finalize_statistics",
    "flatten_intermediates",
    "init",
    "merge",
    "pad_batch",
    "psum",
    "scan_update",
    "select_names",
    "stack_batches",
    "to_core_state",
    "update",
]


# --------------------------------------------------------------------------------------------
# Feature capture
# --------------------------------------------------------------------------------------------

#: The method name Flax uses for a module's output in captured intermediates; dropped from names.
_CALL = "__call__"


def flatten_intermediates(tree: Mapping[Any, Any]) -> dict[str, Array]:
    """Nested intermediates (Flax ``intermediates`` collections, ``nnx`` states, any nested dict) as
    a flat ``{name: array}`` dict.

    Names join the path with dots; a module's output (Flax's ``"__call__"`` entry) is named after
    the module (``"block.Dense_0"``), the model's own output is ``"__call__"`` and comes last. Flax
    stores each ``sow``/capture as a tuple with one value per call: the first call gets the name,
    the ``k``-th later call ``"name:k"``.

    Parameters
    ----------
    tree : mapping
        Keys are names (or ints, for lists of submodules); leaves are arrays or tuples of arrays.

    Returns
    -------
    dict of str -> array, in the mapping's order (Flax linen: the order the values were made).
    """
    flat: dict[str, Array] = {}

    def visit(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, (*path, str(key)))
            return
        if path and path[-1] == _CALL and len(path) > 1:
            path = path[:-1]
        name = ".".join(path)
        values = node if isinstance(node, (tuple, list)) else (node,)
        for k, value in enumerate(values):
            flat[name if k == 0 else f"{name}:{k}"] = value

    if hasattr(tree, "to_pure_dict"):  # an nnx.State: plain nested dicts of values
        tree = _flax("nnx").to_pure_dict(tree)
    visit(tree, ())
    # the model's own output last, so rows run from input to output
    return {
        **{k: v for k, v in flat.items() if k.split(":")[0] != _CALL},
        **{k: v for k, v in flat.items() if k.split(":")[0] == _CALL},
    }


def _flax(submodule: str) -> Any:
    """``flax.<submodule>``, or an ImportError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(f"flax.{submodule}")
    except ImportError as error:
        raise ImportError(
            f"capturing Flax {submodule} intermediates needs flax: pip install 'cka[jax]' (or pip install flax)."
        ) from error


def capture_linen(
    module: Any, variables: Mapping[str, Any], *args: Any, method: Any = None, capture: Any = True, **kwargs: Any
) -> tuple[Any, dict[str, Array]]:
    """Run a Flax linen module and return ``(output, {name: intermediate})``. Pure and jit-able.

    Uses ``module.apply(..., capture_intermediates=capture, mutable=["intermediates"])``: every
    submodule's output (``capture=True``; or a filter ``(module, method_name) -> bool``) and every
    value sown with ``self.sow("intermediates", name, value)``, named by :func:`flatten_intermediates`.

    Parameters
    ----------
    module : flax.linen.Module
    variables : dict
        ``{"params": ..., "batch_stats": ...}`` as from ``module.init``.
    *args, **kwargs
        The module's inputs (e.g. ``train=False``).
    method, capture
        Passed to ``module.apply`` (``capture`` as ``capture_intermediates``).
    """
    output, mutated = module.apply(
        variables, *args, method=method, capture_intermediates=capture, mutable=["intermediates"], **kwargs
    )
    return output, flatten_intermediates(mutated.get("intermediates", {}))


def capture_nnx(model: Any, *args: Any, method_outputs: bool = True, **kwargs: Any) -> tuple[Any, dict[str, Array]]:
    """Run a Flax nnx module and return ``(output, {name: intermediate})``.

    Uses ``nnx.capture(model, nnx.Intermediate, method_outputs=...)``: every submodule's method
    outputs (``method_outputs=True``) and every ``self.sow(nnx.Intermediate, name, value)``. The
    model's attributes are left as they were. Put it in eval mode first (``model.eval()``), or let
    :meth:`JaxModel.from_nnx` do it on a copy.
    """
    nnx = _flax("nnx")
    forward = nnx.capture(model, nnx.Intermediate, method_outputs=nnx.Intermediate if method_outputs else None)
    output, intermediates = forward(*args, **kwargs)
    return output, flatten_intermediates(intermediates)


def _to_jax(value: Any) -> Any:
    """Every torch tensor (by DLPack, no copy on a shared device) and numpy array inside nested
    tuples, lists and dicts as a JAX array."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach()
        if not tensor.is_contiguous():
            tensor = tensor.contiguous()
        try:
            return jnp.from_dlpack(tensor)
        except (
            RuntimeError,
            TypeError,
            ValueError,
            BufferError,
        ):  # a device or dtype JAX cannot share (e.g. MPS): via the host
            return jnp.asarray(tensor.cpu().numpy())
    if isinstance(value, np.ndarray):
        return jnp.asarray(value)
    if isinstance(value, Mapping):
        return {k: _to_jax(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_jax(v) for v in value)
    return value


class JaxModel(FeatureExtractor):
    """A JAX model (Flax linen, Flax nnx, or any function returning intermediates) as one side of a
    :class:`cka.CKA` comparison, or a source of per-layer features for :func:`update`.

    Build it with :meth:`from_linen`, :meth:`from_nnx`, or directly from ``fn(*inputs)`` (or
    ``fn(params, *inputs)`` with ``params=``) returning a nested dict of intermediates, or
    ``(output, dict)``. The forward pass and the selected layers' Grams run in one jitted program,
    so only one ``(L, n, n)`` stack of Grams leaves it (memory ``O(L n^2)``); the comparer hands it to PyTorch by
    DLPack when the other side is a torch model.

    Parameters
    ----------
    fn : callable
        ``fn(*args, **kwargs)`` or ``fn(params, *args, **kwargs)``; returns a (nested) dict of
        intermediates or ``(output, dict)``. Must be traceable by ``jax.jit``.
    layers : selection, optional
        See :func:`select_names`; default all captured intermediates. Patterns and the default need
        ``example`` to learn the names (only its shapes are used).
    params : pytree, optional
        Weights passed as the first argument of ``fn`` (an argument of the jitted program, not a
        constant baked into it).
    example : batch, optional
        A batch (or one with the same shapes and dtypes), to discover the captured names.
    name : str, optional
        Display name.
    inputs : callable, optional
        ``batch -> model inputs`` (an array, a tuple of positional arguments, or a dict of keyword
        arguments), e.g. ``lambda b: b[0].permute(0, 2, 3, 1)`` for an NHWC Flax CNN fed an NCHW
        PyTorch loader. Default: the first element of a tuple batch, or the batch itself. Torch
        tensors are moved to JAX by DLPack.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        layers: Any = None,
        *,
        params: Any = None,
        example: Any = None,
        name: str | None = None,
        inputs: Callable[[Any], Any] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be a callable returning a dict of intermediates; got {type(fn).__name__}.")
        if inputs is not None and not callable(inputs):
            raise TypeError(f"inputs must be a callable batch -> model inputs; got {type(inputs).__name__}.")
        self._fn, self._params, self._inputs = fn, params, inputs
        self._has_params = params is not None
        self.name = name if name is not None else getattr(fn, "__name__", type(fn).__name__)
        self._example = example
        self._available: list[str] | None = None
        self._own_selection = layers is not None
        self._layers: list[str] | None = None
        if layers is not None or example is not None:  # else: resolved by bind() or on first use
            self._select(layers)

    # -- constructors --------------------------------------------------------------------------

    @classmethod
    def from_linen(
        cls,
        module: Any,
        variables: Mapping[str, Any],
        layers: Any = None,
        *,
        example: Any = None,
        name: str | None = None,
        inputs: Callable[[Any], Any] | None = None,
        method: Any = None,
        capture: Any = True,
        **apply_kwargs: Any,
    ) -> JaxModel:
        """A Flax linen module with its ``variables``; intermediates from :func:`capture_linen`.

        ``apply_kwargs`` go to every call (e.g. ``train=False`` for BatchNorm/Dropout in eval mode).
        """

        def fn(variables: Any, *args: Any, **kwargs: Any) -> dict[str, Array]:
            _, captured = capture_linen(
                module, variables, *args, method=method, capture=capture, **apply_kwargs, **kwargs
            )
            return captured

        return cls(
            fn,
            layers,
            params=variables,
            example=example,
            inputs=inputs,
            name=name if name is not None else type(module).__name__,
        )

    @classmethod
    def from_nnx(
        cls,
        model: Any,
        layers: Any = None,
        *,
        example: Any = None,
        name: str | None = None,
        inputs: Callable[[Any], Any] | None = None,
        eval_mode: bool = True,
        method_outputs: bool = True,
    ) -> JaxModel:
        """A Flax nnx module; intermediates from :func:`capture_nnx`.

        The model is split into its graph and state once; every batch runs a fresh copy merged
        inside the jitted program, put in eval mode there (``eval_mode=True``), so the model you
        hold is never modified. Later changes to its weights are not seen: build a new JaxModel.
        """
        nnx = _flax("nnx")
        graphdef, state = nnx.split(model)

        def fn(state: Any, *args: Any, **kwargs: Any) -> dict[str, Array]:
            copy = nnx.merge(graphdef, state)
            if eval_mode:
                copy.eval()
            _, captured = capture_nnx(copy, *args, method_outputs=method_outputs, **kwargs)
            return captured

        return cls(
            fn,
            layers,
            params=state,
            example=example,
            inputs=inputs,
            name=name if name is not None else type(model).__name__,
        )

    # -- selection -----------------------------------------------------------------------------

    def available_layers(self) -> list[str]:
        """Every captured name, in capture order (traced once on ``example`` with ``jax.eval_shape``)."""
        if self._available is None:
            if self._example is None:
                raise ValueError(
                    f"{self.name}: the captured layer names are known only after a trace; pass example=<a batch> "
                    f"(only its shapes are used) or select layers by exact names."
                )
            args, kwargs = self._model_inputs(self._example)
            names: list[str] = []

            def trace(params: Any, args: Any, kwargs: Any) -> dict[str, Array]:
                captured = self._captured(params, args, kwargs)
                names.extend(captured)  # the capture order; eval_shape's output dict would be key-sorted
                return captured

            jax.eval_shape(trace, self._params, args, kwargs)
            self._available = names
        return self._available

    def _select(self, layers: Any) -> None:
        """Resolve ``layers`` (exact names need no trace) and (re)build the jitted programs, which
        read the selection when they are traced."""
        names = [layers] if isinstance(layers, str) else layers
        exact = (
            isinstance(names, (list, tuple)) and names and all(isinstance(s, str) and not is_pattern(s) for s in names)
        )
        if exact and self._example is None:
            # checked against the capture at the first batch; duplicates now, in the shared wording
            self._layers = select_names(list(dict.fromkeys(names)), names, what="layers", owner=self.name)
        else:
            available = self.available_layers()
            if layers is None and not available:
                raise ValueError(f"layers: {self.name} captured no intermediates; sow values or enable capture.")
            self._layers = select_names(available, layers, what="layers", owner=self.name, listing=_LISTING)
        self._features_jit = jax.jit(self._selected)
        self._grams_jit = jax.jit(self._selected_grams, static_argnames=("kernel", "precision"))

    def _selection(self) -> list[str]:
        if self._layers is None:
            self._select(None)  # all captured layers: needs example (a clear error otherwise)
        return self._layers  # type: ignore[return-value]

    def bind(self, *, layers: Any = None, other: FeatureExtractor | None = None) -> None:
        """Take the selection given to ``CKA(model1_layers=...)`` (see :func:`select_names`)."""
        if layers is None:
            return
        if self._own_selection:
            raise ValueError(
                f"{self.name}: layers were selected both when building the JaxModel and in CKA(...); select them "
                f"in one place."
            )
        self._select(layers)

    def layer_names(self) -> list[str]:
        return list(self._selection())

    # -- running -------------------------------------------------------------------------------

    def _model_inputs(self, batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = call_arguments(self._inputs(batch)) if self._inputs is not None else default_inputs(batch)
        return _to_jax(args), _to_jax(kwargs)

    def _captured(self, params: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Array]:
        result = self._fn(params, *args, **kwargs) if self._has_params else self._fn(*args, **kwargs)
        if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Mapping):
            result = result[1]
        if not isinstance(result, Mapping):
            raise TypeError(
                f"{self.name}: fn must return a dict of intermediates or (output, dict); got {type(result).__name__}."
            )
        return flatten_intermediates(result)

    def _selected(self, params: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Array]:
        captured = self._captured(params, args, kwargs)
        missing = [name for name in self._selection() if name not in captured]
        if missing:  # raises: the unknown-name error, with close matches among the captured names
            select_names(list(captured), missing, what="layers", owner=self.name, listing=_LISTING)
        return [captured[name] for name in self._selection()]

    def _selected_grams(
        self, params: Any, args: Any, kwargs: Any, sigma: Any, sigma_frac: Any, kernel: str, precision: str = "highest"
    ) -> Array:
        # The core's Gram (centred features, product in the feature dtype), traced into the same
        # program as the forward pass and stacked there, so XLA frees each feature map once its Gram
        # exists and writes the Grams straight into one (L, n, n) output.
        grams = [
            core._gram_impl(f, kernel, sigma, sigma_frac, None, precision) for f in self._selected(params, args, kwargs)
        ]
        names = self._selection()
        for name, gram in zip(names, grams, strict=True):  # static shapes: checked while tracing
            if gram.shape != grams[0].shape:
                raise GramShapeError(name, tuple(gram.shape), names[0], grams[0].shape[-1])
        return jnp.stack(grams)

    def features(self, batch: Any) -> dict[str, Array]:
        """Selected layer name -> ``(n, ...)`` JAX array for one batch (jitted forward pass)."""
        args, kwargs = self._model_inputs(batch)
        names = self._selection()
        return dict(zip(names, self._features_jit(self._params, args, kwargs), strict=True))

    def grams(self, batch: Any, gram_fn: Callable[[Array], Array]) -> Array | list[Array]:
        """The selected layers' Grams as one ``(L, n, n)`` JAX array (the comparer moves them to torch by
        DLPack when the other side is torch).

        When ``gram_fn`` is :func:`cka.core.gram` with keyword settings (what :class:`cka.CKA`
        passes), the Grams are computed and stacked inside the jitted forward pass; any other
        ``gram_fn`` is applied to the JAX features (a list).
        """
        settings = core_gram_settings(gram_fn)
        self._selection()
        if settings is None:
            return [gram_fn(f) for f in self.features(batch).values()]
        args, kwargs = self._model_inputs(batch)
        return self._grams_jit(
            self._params,
            args,
            kwargs,
            settings["sigma"],
            settings["sigma_frac"],
            kernel=settings["kernel"],
            precision=settings["gram_precision"],
        )


#: How to list a JaxModel's names, for the unknown-name error.
_LISTING = "List the captured names with JaxModel.available_layers() (needs example=)."
