r"""Minibatch CKA over an iterable of batches: :func:`minibatch_cka_matrix` and :func:`minibatch_cka`,
a loop of :func:`cka.state.update_state` over the batches and one :func:`cka.state.finalize`
(Nguyen, Raghu & Kornblith, ICLR 2021), with the per-batch checks (pairing, sizes, skipped batches)
and, when asked for, the statistics of :mod:`cka.statistics`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from cka.backends import get_backend
from cka.core import (
    _check_bandwidth,
    _check_kernel,
    _check_unbiased,
    _warn_about_values,
    min_examples,
    warn_skipped_batches,
)
from cka.state import finalize, init_state, update_state
from cka.statistics import CKAStatistics, CoarseStatisticsWarning, check_statistics_options, finalize_statistics

Array = Any

__all__ = ["minibatch_cka", "minibatch_cka_matrix"]


def _as_layer_list(batch: Any, side: str, index: int) -> list[Array]:
    if isinstance(batch, (list, tuple)):
        layers = list(batch)
    elif isinstance(batch, dict):
        layers = list(batch.values())
    else:
        layers = [batch]
    if not layers:
        raise ValueError(
            f"batch {index}: {side} holds no layer; pass at least one (n, ...) array per batch (a list of "
            f"the layers' features, or a single array for one layer)."
        )
    return layers


def minibatch_cka_matrix(
    xs: Iterable[Sequence[Array]],
    ys: Iterable[Sequence[Array]],
    *,
    kernel: str = "linear",
    unbiased: bool = True,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
    bootstrap: int = 0,
    permutations: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
) -> Array | CKAStatistics:
    r"""Minibatch CKA between every layer of one model and every layer of another.

    .. math:: \mathrm{CKA}_{ij} = \frac{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, L_b^{(j)})}
              {\sqrt{\sum_b \mathrm{HSIC}_1(K_b^{(i)}, K_b^{(i)})\,\sum_b \mathrm{HSIC}_1(L_b^{(j)}, L_b^{(j)})}}

    (Nguyen, Raghu & Kornblith, ICLR 2021), computed with one Gram per layer per batch and one
    matrix product for all pairs, accumulated in float64 (compensated float32 where the framework
    has no float64).

    Parameters
    ----------
    xs : iterable over batches; each a sequence of L1 arrays (n_b, ...)
        Features of the first model's layers (a single array counts as one layer).
    ys : iterable over the same batches; each a sequence of L2 arrays (n_b, ...)
    kernel, unbiased, sigma, sigma_frac
        As in :func:`cka.cka`.
    bootstrap, permutations, confidence, seed
        Bootstrap replicates over batches and permutations of each batch's examples, the interval's
        coverage and the seed of the draws (:mod:`cka.statistics`); batch ``b`` of the iterables is
        the generator's batch index ``b``.

    Returns
    -------
    (L1, L2) array of the inputs' type and device; with ``bootstrap`` or ``permutations``, a
    :class:`CKAStatistics` (the same matrix, bit for bit, with intervals, p-values, null means and
    calibrated scores).

    Batches with fewer than 4 examples (undefined for the unbiased estimator) are skipped with a
    warning; an error if none is left. Batches may differ in size.
    """
    _check_kernel(kernel)
    _check_unbiased(unbiased)
    _check_bandwidth(sigma, sigma_frac)
    check_statistics_options(bootstrap, permutations, confidence, seed)
    resample: dict[str, Any] = {"bootstrap": bootstrap, "permutations": permutations}
    state = None
    skipped: list[int] = []
    batches_x, batches_y = iter(xs), iter(ys)
    index = -1
    for index, batch_x in enumerate(batches_x):
        try:
            batch_y = next(batches_y)
        except StopIteration:
            raise ValueError(
                f"xs has more batches than ys (ys ended after {index}); pass the same batches to both."
            ) from None
        layers_x, layers_y = _as_layer_list(batch_x, "xs", index), _as_layer_list(batch_y, "ys", index)
        b = get_backend(layers_x[0])
        n = b.shape(layers_x[0])[0]
        if n != b.shape(layers_y[0])[0]:
            raise ValueError(
                f"batch {index}: xs has {n} examples but ys has {b.shape(layers_y[0])[0]}; both sides must see "
                f"the same examples in the same order."
            )
        if n < min_examples(unbiased):
            skipped.append(index)
            continue
        if state is None:
            with warnings.catch_warnings():  # warned about once, above
                warnings.simplefilter("ignore", CoarseStatisticsWarning)
                state = init_state(len(layers_x), len(layers_y), like=layers_x[0], **resample)
        try:
            state = update_state(
                state,
                layers_x,
                layers_y,
                kernel=kernel,
                unbiased=unbiased,
                sigma=sigma,
                sigma_frac=sigma_frac,
                batch_index=index,
                seed=seed,
            )
        except ValueError as error:
            raise ValueError(f"batch {index}: {error}") from None
    if next(batches_y, None) is not None:
        raise ValueError(f"ys has more batches than xs ({index + 1}); pass the same batches to both.")
    warn_skipped_batches(skipped, unbiased, stacklevel=2)
    if state is None:
        raise ValueError(
            "no batch with at least 4 examples to compute minibatch CKA from; pass larger batches."
            if skipped
            else "xs is empty: pass at least one batch of features."
        )
    matrix = finalize(state)
    _warn_about_values(get_backend(matrix), matrix, what="minibatch CKA")
    if bootstrap or permutations:
        return finalize_statistics(state, confidence=confidence, matrix=matrix)
    return matrix


def minibatch_cka(
    xs: Iterable[Array],
    ys: Iterable[Array],
    *,
    kernel: str = "linear",
    unbiased: bool = True,
    sigma: float | None = None,
    sigma_frac: float = 0.8,
) -> Array:
    r"""Minibatch CKA between two representations streamed in batches (Nguyen et al. 2021).

    .. math:: \mathrm{CKA} = \frac{\sum_b \mathrm{HSIC}_1(K_b, L_b)}{\sqrt{\sum_b \mathrm{HSIC}_1(K_b, K_b)\,\sum_b \mathrm{HSIC}_1(L_b, L_b)}}

    Parameters
    ----------
    xs, ys : iterables of (n_b, ...) arrays
        Per-batch features of the two representations, same examples in the same order.

    Returns
    -------
    0-d array of the inputs' type. With a single batch it equals ``cka(x, y, unbiased=True)``.
    """
    matrix: Any = minibatch_cka_matrix(
        ([x] for x in xs), ([y] for y in ys), kernel=kernel, unbiased=unbiased, sigma=sigma, sigma_frac=sigma_frac
    )
    return matrix[0, 0]
