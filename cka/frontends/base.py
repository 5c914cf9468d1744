"""The one notion every frontend shares: a feature extractor.

A comparison pairs two extractors (a PyTorch module, an ONNX graph, a JAX function, ...) and feeds
the Grams of their selected layers, batch by batch, to the core accumulator. A third framework is
one small subclass: implement :meth:`FeatureExtractor.layer_names` and :meth:`FeatureExtractor.features`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

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

    def grams(self, batch: Any, gram_fn: Callable[[Array], Array]) -> list[Array]:
        """One ``(n, n)`` Gram per selected layer for ``batch``, in :meth:`layer_names` order."""
        return [gram_fn(f) for f in self.features(batch).values()]

    def bind(self, *, layers: Any = None, other: "FeatureExtractor | None" = None) -> None:
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

    def __enter__(self) -> "FeatureExtractor":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None
