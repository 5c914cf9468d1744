"""The one interface between models and the comparer: a feature extractor.

A comparison (:class:`cka.compare.CKA`) pairs two extractors (a PyTorch module, an ONNX graph, a
JAX function, ...) and feeds the Grams of their selected layers, batch by batch, to the accumulator
(:mod:`cka.state`). A third framework is one small subclass: implement
:meth:`FeatureExtractor.layer_names` and :meth:`FeatureExtractor.features`. Everything else the
comparer asks of an extractor has a default here, so the comparer never branches on a frontend's type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

Array = Any


class FeatureExtractor(ABC):
    """One side of a comparison: turns a batch into the Grams of its selected layers.

    Subclasses implement :meth:`layer_names` and :meth:`features`; those that can compute a layer's
    Gram as soon as the layer has run (torch forward hooks) override :meth:`grams`, so that the full
    feature maps of all layers are never held at once. Set-up and tear-down with side effects
    (hooks, sessions) happen in ``__enter__`` / ``__exit__``; ``__exit__`` always undoes them.
    """

    #: Display name of the model (``model1_name`` in torch_cka's vocabulary).
    name: str = "model"

    @abstractmethod
    def layer_names(self) -> list[str]:
        """The selected layers, in the order of the rows (or columns) of the CKA matrix."""

    @abstractmethod
    def features(self, batch: Any) -> dict[str, Array]:
        """Selected layer name -> ``(n, ...)`` array for one batch, in :meth:`layer_names` order."""

    def grams(self, batch: Any, gram_fn: Callable[[Array], Array]) -> Sequence[Array]:
        """One ``(n, n)`` Gram per selected layer for ``batch``, in :meth:`layer_names` order: a list, or
        one ``(L, n, n)`` array (preferred: :class:`cka.frontends._common.GramStack` fills one in place,
        so no list of Grams and no stacked copy exist beside it). The comparer reads the result before
        it asks for the next batch, so a stack may be reused from batch to batch.

        Grams come in the extractor's own array type (numpy, torch on the model's device, JAX); the
        comparer converts when the two sides differ."""
        return [gram_fn(f) for f in self.features(batch).values()]

    def bind(self, *, layers: Any = None, other: FeatureExtractor | None = None) -> None:
        """Prepare for a comparison: called once by :class:`cka.CKA` (in its constructor) before any batch.

        Parameters
        ----------
        layers
            This side's selection as passed to ``CKA`` (``model1_layers`` / ``model2_layers``), or
            ``None`` when it was not given (keep the extractor's own selection or default). After
            ``bind`` returns, :meth:`layer_names` must give the final rows (or columns).
        other : FeatureExtractor, optional
            The extractor on the other side of the comparison. An extractor whose layers are named
            after *another* framework's modules resolves them here: the ONNX frontend maps PyTorch
            module names to ONNX values through ``other.module`` (a
            :class:`cka.frontends.torch.TorchModel` exposes the ``nn.Module`` as ``.module``, its
            layer names as :meth:`layer_names`, and :meth:`features` on a probe batch to validate a
            mapping), and with ``layers=None`` may mirror ``other.layer_names()``. ``other`` may be
            ``self`` when a model is compared with itself.

        The default accepts ``layers=None`` only: an extractor that takes no selection from ``CKA``
        says so instead of silently ignoring it.
        """
        if layers is not None:
            raise TypeError(
                f"{type(self).__name__} does not take a layer selection from CKA(model1_layers=/model2_layers=); "
                f"select its layers when you construct it."
            )

    def fingerprint(self) -> str:
        """A short string identifying the model and its selected layers, stored in checkpoints so that a
        run never resumes from the sums of another model. The default names the class and the layers;
        frontends that can hash their weights (torch, ONNX) do."""
        return f"{type(self).__name__}:{self.name}:{','.join(self.layer_names())}"

    def start_run(self) -> None:
        """Called by the comparer before the first batch of every :meth:`cka.CKA.compare`: reset per-run
        bookkeeping (the torch frontend's count of layers that ran twice). Default: nothing."""
        return None

    def run_warnings(self) -> list[tuple[str, type[Warning]]]:
        """``(message, category)`` pairs the comparer emits after a run (the torch frontend: layers that
        ran more than once per forward pass). Default: none."""
        return []

    def home_device(self) -> Any:
        """The torch device this extractor's Grams live on, or ``None`` if it does not produce torch
        tensors. A ``torch.distributed`` rank that saw no batch keeps its zero sums there for the
        all-reduce. Default: ``None``."""
        return None

    def token_counts(self) -> Any:
        """When the rows of the last batch's Grams are tokens rather than the batch's examples (token
        features with ``tokens="all"``, :mod:`cka.frontends.tokens`): the real tokens of each sequence,
        a ``(b,)`` integer array, so that the comparer can check that both sides saw the same tokens and
        count sequences. Default: ``None`` (one row per example)."""
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None
