"""The comparer: minibatch CKA between every selected layer of two models, whatever their framework.

:class:`CKA` pairs two feature extractors (:class:`cka.frontends.base.FeatureExtractor`: a PyTorch
module, an ONNX graph, a JAX function), feeds their per-layer Grams batch by batch to the one
accumulator (:mod:`cka.state`), and returns a :class:`~cka.result.CKAResult`. It keeps the API of
``torch_cka.CKA`` (``model1``/``model2`` as ``nn.Module``\\ s, ``model1_layers``, ``device``,
``compare(dataloader1, dataloader2)``, ``export()``, ``plot_results()``, ``hsic_matrix``).

The Grams are accumulated with the backend they arrive in: torch Grams stay torch on their device
(no host synchronisation per batch), numpy Grams numpy, JAX Grams JAX; when the two sides differ,
both go to one: torch if either side is torch (on the comparison device), else JAX. So two ONNX or two
JAX models are compared without torch installed.

Who calls whom: ``cli -> frontends -> compare -> state -> core -> backends``. This module imports no
framework and no frontend at module level. **One deliberate late binding**: a plain model (not an
extractor) is wrapped by its frontend's adapter, found at run time by :func:`_adapter_for` — if torch
is already imported and the model is an ``nn.Module``, ``importlib.import_module("cka.frontends.torch")``
gives ``select_layers`` and ``wrap`` — and the extractor interface is imported at that same point.
Whatever else the comparer needs from an extractor is a method of the interface with a default
(``start_run``, ``run_warnings``, ``home_device``, ``bind``, ``fingerprint``): no branch on its type.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cka import core
from cka import state as engine
from cka._checks import _check_bandwidth, _check_kernel, _check_precision, _check_unbiased
from cka._loaders import describe_data, length, paired, torch_cka_label
from cka._stacks import GramShapeError, _copy, _Side, _side_stack, _to_common_backend
from cka._tally import Tally
from cka._token_rows import check_token_sides, token_rows
from cka.backends import get_backend
from cka.statistics import check_statistics_options, finalize_statistics

if TYPE_CHECKING:
    from cka.frontends.base import FeatureExtractor
    from cka.result import CKAResult

__all__ = ["CKA", "GramShapeError", "describe_data"]


class CKA:
    """Minibatch CKA between every selected layer of two models; the API of ``torch_cka.CKA``.

    Parameters
    ----------
    model1, model2 : nn.Module or FeatureExtractor
        The models; the same object twice compares a model with itself (one forward pass per
        batch serves both sides). Any :class:`~cka.frontends.base.FeatureExtractor` (an ONNX graph,
        a JAX function) works too.
    model1_name, model2_name : str, optional
        Display names; default the class name.
    model1_layers, model2_layers : selection, optional
        For an ``nn.Module`` see :func:`cka.frontends.torch.select_layers` (default: its repeated
        blocks). For a FeatureExtractor the selection is handed to its
        :meth:`~cka.frontends.base.FeatureExtractor.bind`.
    device : str or torch.device, optional
        Move the modules there for the run (restored afterwards) and accumulate there. Default
        (``None``): modules stay where they are, inputs go to each module's device, and the
        accumulators live where the first torch side's Grams are.
    kernel : {"linear", "rbf"}
    unbiased : bool
        Unbiased HSIC per batch (Nguyen et al. 2021; default) or the biased estimator.
    sigma, sigma_frac : float
        RBF bandwidth (see :func:`cka.core.rbf_kernel`).
    inputs, output, reduce
        As in :class:`cka.frontends.torch.TorchModel`, for both sides (wrap a model in ``TorchModel``
        yourself to set them per side).
    tokens, mask
        Token features of ``(batch, tokens, ...)`` outputs, for both sides (plain ``nn.Module`` objects; a
        ``TorchModel`` takes its own): ``"mean"``, ``"first"``, ``"last"`` (one example per sequence)
        or ``"all"`` (every real token an example), read where the batch's ``attention_mask`` (or
        ``mask(batch)``) is 1, so padding never reaches the Gram (:mod:`cka.frontends.tokens`). With
        ``"all"``, ``n_examples`` counts real tokens, ``settings["n_sequences"]`` the sequences, and
        both models must see the same real tokens per sequence: two tokenizers that split the text
        differently are an error.
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
        model1: Any,
        model2: Any,
        model1_name: str | None = None,
        model2_name: str | None = None,
        model1_layers: Any = None,
        model2_layers: Any = None,
        device: Any = None,
        *,
        kernel: str = "linear",
        unbiased: bool = True,
        sigma: float | None = None,
        sigma_frac: float = 0.8,
        gram_precision: str = "highest",
        inputs: Callable[[Any], Any] | None = None,
        output: Any = None,
        reduce: str | Mapping[str, str] | None = None,
        tokens: str | Mapping[str, str | None] | None = None,
        mask: Callable[[Any], Any] | None = None,
        progress: bool = True,
    ) -> None:
        _check_kernel(kernel)
        _check_unbiased(unbiased)  # "no" would count as True
        _check_bandwidth(sigma, sigma_frac)  # a negative bandwidth would be silently made positive
        _check_precision(gram_precision)  # "highest" | "tf32" | "bf16": the user's choice, never a silent default
        self.gram_precision = gram_precision
        self.kernel, self.unbiased, self.sigma, self.sigma_frac = kernel, bool(unbiased), sigma, sigma_frac
        self.progress = progress
        adapter1, adapter2 = _adapter_for(model1, "model1"), _adapter_for(model2, "model2")
        self.device = _as_device(device)
        options = {"output": output, "reduce": reduce, "inputs": inputs, "device": self.device}
        if tokens is not None or mask is not None:  # token features: for plain modules, as output=/reduce=
            check_token_sides(adapter1, adapter2)
            options.update(tokens=tokens, mask=mask)
        self.tokens = dict(tokens) if isinstance(tokens, Mapping) else tokens
        self.model1, self.model2 = model1, model2
        # resolved up front, so that per-layer settings can be split between the sides
        selected1 = adapter1.select_layers(model1, model1_layers, what="model1_layers") if adapter1 else []
        selected2 = adapter2.select_layers(model2, model2_layers, what="model2_layers") if adapter2 else []
        adapter = adapter1 or adapter2
        if adapter is not None:  # per-layer output=/reduce= dicts may only name selected layers
            adapter.check_options(options, selected1 + selected2)

        if model1 is model2 and adapter1 is not None:
            # The same model on both sides: one extractor hooks the union of both selections, so a
            # layer selected for both sides is computed once, and one forward pass serves both.
            union = list(dict.fromkeys(selected1 + selected2))
            shared = adapter1.wrap(model1, union, name=model1_name, what="model1_layers", **_restrict(options, union))
            self._side1 = _Side(shared, selected1, [union.index(n) for n in selected1], "model1", True)
            self._side2 = _Side(shared, selected2, [union.index(n) for n in selected2], "model2", True)
        else:
            self._side1 = _make_side(model1, adapter1, selected1, model1_name, "model1", options)
            self._side2 = _make_side(model2, adapter2, selected2, model2_name, "model2", options)
        self._bind(model1_layers, model2_layers)
        self.model1_name = model1_name if model1_name is not None else self._side1.extractor.name
        self.model2_name = model2_name if model2_name is not None else self._side2.extractor.name
        self.result: CKAResult | None = None
        #: The last ``(L1, L2)`` CKA matrix: a float64 CPU torch tensor when the sums were torch (as
        #: torch_cka's), else a numpy array.
        self.hsic_matrix: Any = None
        self._datasets = ("", "")
        self._statistics: dict[str, Any] = {"bootstrap": 0, "permutations": 0}
        self._labels = ("", "")

    def _bind(self, model1_layers: Any, model2_layers: Any) -> None:
        """Hand each extractor given by the caller its layer selection and the other side (see
        :meth:`FeatureExtractor.bind`), then read the final layer names."""
        sides = ((self._side1, self._side2, model1_layers), (self._side2, self._side1, model2_layers))
        for side, other, layers in sides:
            if side.wrapped:
                continue
            side.extractor.bind(layers=layers, other=other.extractor)
            side.layers = list(side.extractor.layer_names())
            side.indices = list(range(len(side.layers)))
            duplicates = sorted({n for n in side.layers if side.layers.count(n) > 1})
            if duplicates:
                raise ValueError(
                    f"{side.extractor.name} selects layers {duplicates} more than once; each may appear once."
                )

    # -- torch_cka's API -----------------------------------------------------------------------

    def compare(
        self,
        dataloader1: Iterable[Any],
        dataloader2: Iterable[Any] | None = None,
        *,
        dataset1_name: str | None = None,
        dataset2_name: str | None = None,
        checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 100,
        bootstrap: int = 0,
        permutations: int = 0,
        confidence: float = 0.95,
        seed: int = 0,
    ) -> CKAResult:
        """Accumulate minibatch CKA over the batches of ``dataloader1`` (and ``dataloader2``).

        Parameters
        ----------
        dataloader1 : iterable of batches
            A ``DataLoader`` or any iterable of tensors/arrays, ``(inputs, targets, ...)`` tuples or dicts.
        dataloader2 : iterable of batches, optional
            If given, model2 sees these batches (paired with dataloader1's in order: the same number
            of batches and of examples per batch). If not, **one** iteration of dataloader1 feeds
            both models (so a shuffling loader still pairs the examples).
        dataset1_name, dataset2_name : str, optional
            What the data is (the CLI passes its data spec), recorded in the result's settings.
            Default: a description from the loader (data set class and length, batch size, sampler),
            never an object's memory address, so two runs on the same data record the same.
        checkpoint : path, optional
            Save the accumulator state, the position and what identifies the data (examples per batch
            and a digest of each batch, :mod:`cka._digest`) there every ``checkpoint_every`` batches and
            at the end (atomically). If the file exists, the run resumes from it: the batches already
            counted are drawn from the loaders (and checked against the digests) but not run through the
            models, and the result equals an uninterrupted run's. A checkpoint from other models, layers,
            settings or data (another order, batch size or a shorter loader) is refused, naming the first
            differing batch. Under ``torch.distributed`` each rank keeps its own file (``run.rank0-of-4.ckpt``).
        checkpoint_every : int
            Batches between two checkpoints (each one is a host synchronisation and a small write).
        bootstrap, permutations : int
            Error bars and a null for every cell, in the same pass (:mod:`cka.statistics`): ``R``
            bootstrap replicates over batches give ``ci_low``/``ci_high`` at ``confidence``; ``P``
            permutations of each batch's examples give ``p_value``, ``null_mean``, ``calibrated`` and
            the best-match p-values ``p_value_best_row``/``p_value_best_col``. ``matrix`` is unchanged,
            bit for bit. The draws are keyed by ``seed`` and each batch's index in the stream, so
            ranks and resumes give the same result (the checkpoint records all four settings).
            ``permutations`` with ``tokens="all"`` is a ValueError (a sequence's tokens are not
            exchangeable examples).
        confidence : float
            Coverage of the intervals (default 0.95).
        seed : int
            Seed of the bootstrap weights and permutations.

        Under ``torch.distributed`` (initialised process group), each rank accumulates the batches it
        is given (:func:`cka.distributed.shard_batches`) and one all-reduce combines the sums: every
        rank returns the same result, equal to one process over the same batches.

        Returns
        -------
        CKAResult
            Also kept as ``self.result`` for :meth:`export` and :meth:`plot_results`.

        Raises
        ------
        ValueError
            Loaders of different lengths or batch sizes (batch index named), no batch with at least
            4 examples, NaN/Inf in a layer's features (layer and first batch named), a checkpoint that
            does not match (:class:`cka.checkpoint.CheckpointError`).
        """
        check_statistics_options(bootstrap, permutations, confidence, seed)
        if permutations and _all_tokens(self.tokens):
            raise ValueError(_TOKENS_ALL_PERMUTATIONS)
        self._statistics = {
            "bootstrap": bootstrap,
            "permutations": permutations,
            "confidence": confidence,
            "seed": seed,
        }
        separate = dataloader2 is not None
        if separate:
            len1, len2 = length(dataloader1), length(dataloader2)
            if len1 is not None and len2 is not None and len1 != len2:
                raise ValueError(
                    f"dataloader1 has {len1} batches but dataloader2 has {len2}; both must yield the same "
                    f"number of batches with the same number of examples each."
                )
        second = dataloader2 if separate else dataloader1
        self._datasets = (
            describe_data(dataloader1, dataset1_name),
            describe_data(second, dataset2_name if (separate or dataset2_name is not None) else dataset1_name),
        )
        self._labels = (torch_cka_label(dataloader1), torch_cka_label(second))
        gram_fn = functools.partial(
            core.gram,
            kernel=self.kernel,
            sigma=self.sigma,
            sigma_frac=self.sigma_frac,
            check=False,
            gram_precision=self.gram_precision,
        )
        shared_pass = self._side1.extractor is self._side2.extractor and not separate
        tally = Tally(len(self._side1.layers), len(self._side2.layers), self.unbiased, bootstrap, permutations, seed)
        saver = None
        if checkpoint is not None:
            from cka.checkpoint import RunCheckpoint

            saver = RunCheckpoint(checkpoint, checkpoint_every, self._fingerprint())
        start = saver.restore(tally) if saver is not None else 0
        extractors = list(dict.fromkeys([self._side1.extractor, self._side2.extractor]))
        for extractor in extractors:
            extractor.start_run()

        from tqdm.auto import tqdm

        with contextlib.ExitStack() as stack:
            for extractor in extractors:
                stack.enter_context(extractor)
            # an iterator, not the loader: tqdm.auto calls iter() on what it gets more than once, and
            # each iter() of a DataLoader is a new epoch (new shuffle, new workers)
            bar = tqdm(
                iter(dataloader1), total=length(dataloader1), desc="| Comparing features |", disable=not self.progress
            )
            stack.callback(bar.close)
            index = -1
            for index, (batch1, batch2) in enumerate(paired(bar, dataloader2)):
                if saver is not None:
                    saver.see(index, batch1, batch2 if separate else None)
                if index < start:  # already in the restored sums
                    continue
                grams1, grams2, sequences = self._grams(batch1, batch2, gram_fn, shared_pass, index)
                if permutations and sequences is not None:  # a TorchModel of its own with tokens="all"
                    raise ValueError(_TOKENS_ALL_PERMUTATIONS)
                tally.add(index, grams1, grams2, sequences)
                del grams1, grams2  # the extractors reuse their stacks for the next batch
                if saver is not None:
                    saver.maybe_save(tally, index + 1)
            if saver is not None:
                saver.finish(tally, index + 1)
        return self._finish(tally, extractors)

    def _grams(
        self, batch1: Any, batch2: Any, gram_fn: Callable[[Any], Any], shared_pass: bool, index: int
    ) -> tuple[Any, Any, int | None]:
        """Both sides' ``(L, n, n)`` Gram stacks for one batch, in one backend (on one device), and the
        batch's sequences when the rows are its real tokens (``tokens="all"``; else None)."""
        try:
            raw1 = self._side1.extractor.grams(batch1, gram_fn)
            stack1 = _side_stack(self._side1, raw1, index)
            counts1 = self._side1.extractor.token_counts()  # read before one model's second pass replaces it
            if shared_pass:
                raw2 = raw1
            else:
                if self._side2.extractor is self._side1.extractor:  # one model, two loaders: its stack is reused
                    stack1 = _copy(stack1)
                raw2 = self._side2.extractor.grams(batch2, gram_fn)
        except GramShapeError as error:
            what = "model1" if error.layer in self._side1.layers else "model2"
            raise ValueError(f"batch {index}: {error.describe(' of ' + what)}") from None
        stack2 = _side_stack(self._side2, raw2, index)
        stack1, stack2 = _to_common_backend(stack1, stack2, self.device)
        sequences = token_rows(counts1, self._side2.extractor.token_counts(), index)
        if stack1.shape[-1] != stack2.shape[-1]:
            raise ValueError(
                f"batch {index}: model1 ({self.model1_name}) got {stack1.shape[-1]} examples but model2 "
                f"({self.model2_name}) got {stack2.shape[-1]}; both sides must see the same examples in "
                f"the same order (same batch size, same drop_last)."
            )
        return stack1, stack2, sequences

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint must match: both models (weights hashed), layers and settings."""
        from cka.distributed import rank_and_world_size

        rank, world_size = rank_and_world_size()
        return {
            "model1": self._side1.extractor.fingerprint(),
            "model2": self._side2.extractor.fingerprint(),
            "model1_layers": list(self._side1.layers),
            "model2_layers": list(self._side2.layers),
            "kernel": self.kernel,
            "unbiased": self.unbiased,
            "sigma": self.sigma,
            "sigma_frac": self.sigma_frac,
            "gram_precision": self.gram_precision,
            "rank": rank,
            "world_size": world_size,
            # statistics' settings, recorded when asked for (so plain runs keep their old fingerprint)
            **(self._statistics if self._statistics["bootstrap"] or self._statistics["permutations"] else {}),
        }

    def _empty_like(self) -> Any:
        """An array of the type and device where a rank that saw no batch keeps its zero sums."""
        for device in (self.device, self._side1.extractor.home_device(), self._side2.extractor.home_device()):
            if device is not None and sys.modules.get("torch") is not None:
                return sys.modules["torch"].zeros((), device=device)
        return np.zeros(())

    def _finish(self, tally: Tally, extractors: Sequence[FeatureExtractor]) -> CKAResult:
        from cka.distributed import is_distributed
        from cka.result import CKAResult

        if is_distributed():
            tally.all_reduce(self._empty_like())
        core.warn_skipped_batches(tally.skipped, self.unbiased, stacklevel=3)
        if tally.state is None:
            if tally.skipped:
                raise ValueError(
                    f"no batch with at least {core.min_examples(self.unbiased)} examples (skipped {tally.skipped}); "
                    f"use a larger batch size."
                )
            raise ValueError("dataloader1 yielded no batches; pass a loader with at least one batch of 4+ examples.")
        for side, bad in zip((self._side1, self._side2), tally.first_bad_numpy(), strict=True):
            if (bad >= 0).any():
                layer = int(np.flatnonzero(bad >= 0)[0])
                where = f"batch {int(bad[layer])}"
                if tally.world_size > 1:
                    where = f"batch {int(bad[layer]) // tally.world_size} of rank {int(bad[layer]) % tally.world_size}"
                raise ValueError(
                    f"layer {side.layers[layer]!r} of {side.what} ({getattr(self, side.what + '_name')}) produced NaN "
                    f"or Inf features in {where} (first seen); check the model and that batch's data."
                )
        state = tally.state
        b = get_backend(state.hsic_xy)
        matrix = np.asarray(b.to_numpy(engine.finalize(state)), dtype=np.float64)
        hsic_xx, hsic_yy = (np.asarray(b.to_numpy(f), dtype=np.float64) for f in (state.hsic_xx, state.hsic_yy))
        self._warn_about(matrix, hsic_xx, hsic_yy)
        for extractor in extractors:
            for message, category in extractor.run_warnings():
                warnings.warn(message, category, stacklevel=3)
        settings = {
            "kernel": self.kernel,
            "unbiased": self.unbiased,
            "n_batches": int(b.to_numpy(state.n_batches)),
            "skipped_batches": tally.skipped,
            "dataset1": self._datasets[0],
            "dataset2": self._datasets[1],
        }
        if self.kernel == "rbf":
            settings.update(sigma=self.sigma, sigma_frac=self.sigma_frac)
        if self.gram_precision != "highest":
            settings.update(gram_precision=self.gram_precision)
        if self.tokens is not None or any(e.token_counts() is not None for e in extractors):
            settings.update(tokens=self.tokens, n_sequences=tally.sequences)
        self.hsic_matrix = sys.modules["torch"].from_numpy(matrix) if tally.backend == "torch" else matrix
        self.result = CKAResult(
            matrix,
            tuple(self._side1.layers),
            tuple(self._side2.layers),
            self.model1_name,
            self.model2_name,
            int(b.to_numpy(state.n_examples)),
            settings,
            **self._statistics_fields(state, matrix, settings),
        )
        return self.result

    def _statistics_fields(self, state: Any, matrix: np.ndarray, settings: dict[str, Any]) -> dict[str, Any]:
        """The result's statistics (float64 numpy; empty without ``bootstrap``/``permutations``), their
        settings recorded in ``settings``; ``matrix`` (the point estimate) is not touched."""
        options = self._statistics
        if not (options["bootstrap"] or options["permutations"]):
            return {}
        settings.update(options)
        statistics = finalize_statistics(state, confidence=options["confidence"])  # in the sums' backend
        b = get_backend(state.hsic_xy)
        return {
            name: np.asarray(b.to_numpy(value), dtype=np.float64)
            for name, value in statistics._asdict().items()
            if name != "matrix" and value is not None
        }

    def _warn_about(self, matrix: np.ndarray, hsic_xx: np.ndarray, hsic_yy: np.ndarray) -> None:
        """Name constant layers (NaN rows/columns) and values beyond 1 (a numerics bug); never clip."""
        constant = [self._side1.layers[i] for i in np.flatnonzero(hsic_xx <= 0)]
        constant += [self._side2.layers[j] for j in np.flatnonzero(hsic_yy <= 0)]
        if constant:
            warnings.warn(
                f"CKA is NaN for layer(s) {constant}: their features are constant over the examples (zero "
                f"variance), so CKA is undefined there.",
                core.CKANumericsWarning,
                stacklevel=4,
            )
        finite = matrix[np.isfinite(matrix)]
        if finite.size and float(np.abs(finite).max()) > 1 + 1e-6:
            warnings.warn(
                f"CKA exceeds 1 in magnitude (max {float(np.abs(finite).max()):.9g}); in exact arithmetic |CKA| <= 1, "
                f"so this is a numerical problem; please report it with the models.",
                core.CKANumericsWarning,
                stacklevel=4,
            )

    def export(self) -> dict[str, Any]:
        """torch_cka's export: ``{"model1_name", "model2_name", "CKA", "model1_layers", "model2_layers",
        "dataset1_name", "dataset2_name"}``; ``CKA`` is the ``(L1, L2)`` float64 matrix (a CPU tensor
        for torch comparisons) whose rows and columns follow ``model1_layers`` and ``model2_layers``.
        The dataset names are torch_cka's labels (the first line of the data set's repr); the result's
        settings hold an address-free description instead."""
        result = self._require_result("export")
        return {
            "model1_name": result.model1_name,
            "model2_name": result.model2_name,
            "CKA": self.hsic_matrix,
            "model1_layers": list(result.model1_layers),
            "model2_layers": list(result.model2_layers),
            "dataset1_name": self._labels[0],
            "dataset2_name": self._labels[1],
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


# --------------------------------------------------------------------------------------------
# Models to extractors (the one late binding)
# --------------------------------------------------------------------------------------------


def _adapter_for(model: Any, what: str) -> Any:
    """``None`` for a FeatureExtractor; the frontend module that wraps ``model`` (``select_layers`` and
    ``wrap``) for a plain ``nn.Module``. Torch is never imported here: a model can only be an
    ``nn.Module`` if the caller has imported torch already."""
    from cka.frontends.base import FeatureExtractor

    if isinstance(model, FeatureExtractor):
        return None
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(model, torch.nn.Module):
        return importlib.import_module("cka.frontends.torch")
    raise TypeError(
        f"{what} must be a torch.nn.Module or a cka FeatureExtractor (e.g. cka.frontends.onnx.OnnxModel, "
        f"cka.frontends.jax.JaxModel); got {type(model).__module__}.{type(model).__qualname__}."
    )


def _make_side(
    model: Any, adapter: Any, layers: list[str], name: str | None, what: str, options: dict[str, Any]
) -> _Side:
    if adapter is None:
        if name is not None:
            model.name = name
        return _Side(model, [], [], what, wrapped=False)  # layers filled in by CKA._bind
    extractor = adapter.wrap(model, layers, name=name, what=f"{what}_layers", **_restrict(options, layers))
    names = extractor.layer_names()
    return _Side(extractor, names, list(range(len(names))), what, wrapped=True)


def _as_device(device: Any) -> Any:
    """``device`` as a ``torch.device`` when torch is loaded (checked at once), else as given."""
    torch = sys.modules.get("torch")
    if device is None or torch is None:
        return device
    return torch.device(device)


_TOKENS_ALL_PERMUTATIONS = (
    "permutations= cannot be combined with tokens='all': the permutation null shuffles the examples within each "
    "batch, which assumes they are exchangeable, and the tokens of one sequence are not (they share its context), "
    "so the null would be too narrow and the p-values too small. Use tokens='mean', 'first' or 'last' (one example "
    "per sequence) for p-values, or bootstrap= alone for intervals (batches are resampled whole)."
)


def _all_tokens(tokens: Any) -> bool:
    """Whether a ``tokens=`` setting (one mode, or a mode per layer) makes any layer's tokens the examples."""
    modes = tokens.values() if isinstance(tokens, Mapping) else [tokens]
    return "all" in modes


def _restrict(options: Mapping[str, Any], layers: Sequence[str]) -> dict[str, Any]:
    """``options`` with per-layer dicts cut down to ``layers`` (one side's share)."""
    return {
        k: ({n: v for n, v in o.items() if n in layers} if isinstance(o, Mapping) else o) for k, o in options.items()
    }


# --------------------------------------------------------------------------------------------
# Grams from the two sides, in one backend
# --------------------------------------------------------------------------------------------
