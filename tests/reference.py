"""A float64 reference straight from the formulas: slow and obvious, no shared code with cka.

Nothing here centres features, zeroes diagonals by broadcasting tricks or fuses terms: each
estimator is written as the paper writes it, with explicit matrices.
"""

from __future__ import annotations

import numpy as np


def flatten(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(x.shape[0], -1)


def linear_gram(x) -> np.ndarray:
    """K = X X^T."""
    x = flatten(x)
    return x @ x.T


def rbf_gram(x, sigma_frac: float = 0.8, sigma: float | None = None) -> np.ndarray:
    """K_ab = exp(-|x_a - x_b|^2 / (2 sigma^2)), sigma^2 = sigma_frac^2 median_ab |x_a - x_b|^2."""
    x = flatten(x)
    sq_distances = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    if sigma is None:
        sigma = sigma_frac * np.sqrt(np.median(sq_distances))
    return np.exp(-sq_distances / (2 * sigma**2))


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (K and L of the papers)
    """Gretton et al. 2005: tr(K H L H) / (n-1)^2."""
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h) / (n - 1) ** 2)


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al. 2012, Eq. (5)."""
    n = k.shape[0]
    kt = k - np.diag(np.diag(k))
    lt = l - np.diag(np.diag(l))
    ones = np.ones(n)
    term1 = np.trace(kt @ lt)
    term2 = (ones @ kt @ ones) * (ones @ lt @ ones) / ((n - 1) * (n - 2))
    term3 = 2 / (n - 2) * (ones @ kt @ lt @ ones)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def cka_from_grams(k, l, unbiased: bool = False) -> float:  # noqa: E741
    h = hsic_unbiased if unbiased else hsic_biased
    return h(k, l) / np.sqrt(h(k, k) * h(l, l))


def cka(x, y, kernel: str = "linear", unbiased: bool = False, sigma_frac: float = 0.8, sigma=None) -> float:
    if kernel == "linear":
        k, l = linear_gram(x), linear_gram(y)  # noqa: E741
    else:
        k, l = rbf_gram(x, sigma_frac, sigma), rbf_gram(y, sigma_frac, sigma)  # noqa: E741
    return cka_from_grams(k, l, unbiased)


def gram(x, kernel: str = "linear", sigma_frac: float = 0.8, sigma: float | None = None) -> np.ndarray:
    """The kernel matrix of one layer's features, by name."""
    if kernel == "linear":
        return linear_gram(x)
    if kernel == "rbf":
        return rbf_gram(x, sigma_frac, sigma)
    raise ValueError(f"unknown kernel {kernel!r}")


def minibatch_cka_matrix(batches_x, batches_y, unbiased: bool = True, kernel: str = "linear",
                         sigma_frac: float = 0.8) -> np.ndarray:
    """Nguyen et al. 2021: sums of per-batch HSIC over batches, then the CKA ratio, for every pair.

    ``batches_x[b]`` is the list of layer features of batch ``b``; an RBF bandwidth is set per batch
    and layer from that batch's median distance, as the library does."""
    h = hsic_unbiased if unbiased else hsic_biased
    first_x, first_y = batches_x[0], batches_y[0]
    xy = np.zeros((len(first_x), len(first_y)))
    xx = np.zeros(len(first_x))
    yy = np.zeros(len(first_y))
    for layers_x, layers_y in zip(batches_x, batches_y, strict=True):
        kx = [gram(a, kernel, sigma_frac) for a in layers_x]
        ky = [gram(a, kernel, sigma_frac) for a in layers_y]
        for i, k in enumerate(kx):
            xx[i] += h(k, k)
            for j, gram_y in enumerate(ky):
                xy[i, j] += h(k, gram_y)
        for j, gram_y in enumerate(ky):
            yy[j] += h(gram_y, gram_y)
    return xy / np.sqrt(np.outer(xx, yy))
