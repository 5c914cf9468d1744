"""Argument checks and warnings of the functional API: what is refused, with which words.

Every check names the argument, what was expected, what was given and the fix (STYLE.md). Only
static properties (shapes, dtypes, Python arguments) are checked inside traced code; value checks
(NaN/Inf, constant layers) run at the public boundary and only outside a trace.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

from cka.backends import PRECISIONS, Backend, get_backend

Array = Any

KERNELS = ("linear", "rbf")


class BiasedCKAWarning(UserWarning):
    """Biased CKA was asked for where it is misleading (more features than examples)."""


class CKANumericsWarning(UserWarning):
    """A CKA value is NaN (undefined) or outside [-1, 1] beyond rounding, or a Gram can't hold its scale."""


# --------------------------------------------------------------------------------------------
# Python arguments
# --------------------------------------------------------------------------------------------


def _check_flag(name: str, value: Any, meaning: str = "") -> None:
    """``value`` must be a bool (Python or numpy): ``"no"`` or ``0`` would otherwise count as one."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return
    raise TypeError(f"{name} must be True or False; got {value!r} ({type(value).__name__}).{meaning}")


def _check_unbiased(unbiased: Any) -> None:
    """``unbiased`` must be a bool: a truthy string such as ``"no"`` would silently pick the debiased estimator."""
    _check_flag(
        "unbiased",
        unbiased,
        " Pass unbiased=True for the debiased estimator (Song et al. 2012) or unbiased=False for the biased one.",
    )


def _check_kernel(kernel: Any) -> None:
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; valid kernels: {', '.join(KERNELS)}.")


def _check_precision(gram_precision: Any) -> None:
    if not isinstance(gram_precision, str) or gram_precision not in PRECISIONS:
        raise ValueError(
            f"unknown gram_precision {gram_precision!r}; valid values: 'highest' (full precision of the "
            f"features' dtype, the default), 'tf32' (TensorFloat-32 products on GPUs that have them), "
            f"'bf16' (inputs rounded to bfloat16, float32 accumulation)."
        )


def _check_bandwidth(sigma: Any, sigma_frac: Any) -> None:
    """``sigma`` (if given) and ``sigma_frac`` must be positive finite real numbers (traced values pass)."""
    for name, value in (("sigma", sigma), ("sigma_frac", sigma_frac)):
        if value is None and name == "sigma":
            continue
        what = "the RBF bandwidth" if name == "sigma" else "the RBF bandwidth as a fraction of the median distance"
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise TypeError(f"{name} must be a positive real number ({what}); got {value!r} ({type(value).__name__}).")
        if type(value).__name__.endswith("Tracer"):  # a jax.jit argument: its value is not known here
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"{name} must be a positive real number ({what}); got {value!r} ({type(value).__name__})."
            ) from None
        if not (math.isfinite(number) and number > 0):
            raise ValueError(
                f"{name} must be a positive, finite number ({what}); got {value!r}. A bandwidth of zero or "
                f"below has no kernel; Kornblith et al. (2019) use sigma_frac between 0.2 and 0.8."
            )


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------


def _backend_of(*arrays: Array, names: Sequence[str]) -> Backend:
    """The common backend of ``arrays``; a clear error when array types or devices are mixed.

    Mixed types are refused rather than converted: a silent numpy<->torch<->JAX conversion would
    move data between devices and cut autograd graphs behind the caller's back.
    """
    backends = [get_backend(a) for a in arrays]
    first = backends[0]
    for name, a, b in zip(names, arrays, backends, strict=True):
        if b is not first:
            raise TypeError(
                f"{names[0]} is a {first.name} array but {name} is a {b.name} array; pass both as the "
                f"same type, e.g. convert with torch.as_tensor(...), numpy.asarray(...) or jax.numpy.asarray(...)."
            )
        devices = (first.device(a), first.device(arrays[0]))
        if None not in devices and devices[0] != devices[1]:
            raise ValueError(
                f"{names[0]} is on {devices[1]} but {name} is on {devices[0]}; "
                f"move both to one device first (e.g. {name}.to({names[0]}.device))."
            )
    return first


def _check_dtype(b: Backend, x: Array, name: str) -> None:
    """Features and Grams must hold real numbers: complex ones would lose their imaginary part."""
    if b.is_real_numeric(x):
        return
    if b.is_complex(x):
        raise TypeError(
            f"{name} has the complex dtype {x.dtype}; CKA compares real features and casting would drop the "
            f"imaginary part. Pass real features, e.g. the real and imaginary parts side by side "
            f"(numpy.concatenate([{name}.real, {name}.imag], axis=1), torch.cat likewise) or the magnitudes abs({name})."
        )
    if not b.is_real_numeric(x):
        raise TypeError(
            f"{name} has dtype {x.dtype}; features must be real numbers (floating, integer or boolean); "
            f"convert {name} to a float array first."
        )


def _check_features(b: Backend, x: Array, name: str, values: bool = True) -> None:
    """Shape ``(n, ...)``, a real dtype and (``values``, outside traces) no NaN/Inf."""
    shape = b.shape(x)
    if len(shape) == 0:
        raise ValueError(f"{name} must have shape (n_samples, ...); got a scalar.")
    _check_dtype(b, x, name)
    if values and not b.is_tracing(x) and not b.all_finite(x):
        raise ValueError(
            f"{name} contains NaN or Inf values (shape {shape}); check the model or data that produced it."
        )


def _check_pair_n(b: Backend, x: Array, y: Array, names: tuple[str, str] = ("x", "y")) -> int:
    nx, ny = b.shape(x)[0], b.shape(y)[0]
    if nx != ny:
        raise ValueError(
            f"{names[0]} and {names[1]} must hold the same examples in the same order, but "
            f"{names[0]} has shape {b.shape(x)} ({nx} examples) and {names[1]} has shape {b.shape(y)} "
            f"({ny} examples); pass features of the same batch for both."
        )
    return nx


def min_examples(unbiased: bool) -> int:
    """Fewest examples a batch needs: 4 for the unbiased HSIC estimator (its ``n - 3`` factor), 2 otherwise."""
    return 4 if unbiased else 2


def warn_skipped_batches(skipped: Sequence[int], unbiased: bool, stacklevel: int = 2) -> None:
    """The one warning for batches left out for having fewer than :func:`min_examples` examples."""
    if skipped:
        warnings.warn(
            f"skipped batch(es) {list(skipped)} with fewer than {min_examples(unbiased)} examples: the "
            f"{'unbiased ' if unbiased else ''}HSIC estimator is undefined there.",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


def _check_n(n: int, unbiased: bool, what: str = "the batch") -> None:
    if unbiased and n < 4:
        raise ValueError(
            f"the unbiased HSIC estimator needs at least 4 examples, but {what} has {n}; "
            f"use a larger batch or unbiased=False."
        )
    if n < 2:
        raise ValueError(f"CKA needs at least 2 examples, but {what} has {n}.")


def _check_grams(b: Backend, gram_x: Array, gram_y: Array) -> int:
    for name, k in (("gram_x", gram_x), ("gram_y", gram_y)):
        shape = b.shape(k)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"{name} must be a square (n, n) kernel matrix; got shape {shape}.")
        _check_dtype(b, k, name)
    if b.shape(gram_x) != b.shape(gram_y):
        raise ValueError(
            f"gram_x and gram_y must be kernels over the same n examples; got shapes "
            f"{b.shape(gram_x)} and {b.shape(gram_y)}."
        )
    for name, k in (("gram_x", gram_x), ("gram_y", gram_y)):
        if not b.is_tracing(k) and not b.all_finite(k):
            raise ValueError(f"{name} contains NaN or Inf values.")
    return b.shape(gram_x)[0]


# --------------------------------------------------------------------------------------------
# Warnings about results
# --------------------------------------------------------------------------------------------


def _warn_if_biased_misleading(unbiased: bool, n: int, dx: int, dy: int) -> None:
    if not unbiased and max(dx, dy) > n:
        warnings.warn(
            f"biased CKA with more features than examples (n={n}, d={max(dx, dy)}) is biased towards 1: "
            f"independent random features score near 1 (Murphy et al. 2024). Use unbiased=True for the "
            f"debiased estimate.",
            BiasedCKAWarning,
            stacklevel=3,
        )


def _warn_about_values(b: Backend, values: Array, what: str = "CKA") -> None:
    """Warn (never clip) when a result is NaN or exceeds 1 in magnitude beyond rounding."""
    if b.is_tracing(values):
        return
    import numpy

    v = numpy.atleast_1d(b.to_numpy(values))
    if numpy.isnan(v).any():
        where = numpy.argwhere(numpy.isnan(numpy.atleast_2d(v)))
        warnings.warn(
            f"{what} is NaN at {len(where)} entr{'y' if len(where) == 1 else 'ies'} (first: index "
            f"{tuple(int(i) for i in where[0])}): a constant (zero-variance) input, or an RBF bandwidth of zero, has no CKA.",
            CKANumericsWarning,
            stacklevel=3,
        )
    if (numpy.abs(v[~numpy.isnan(v)]) > 1 + 1e-6).any():
        warnings.warn(
            f"{what} exceeds 1 in magnitude (max {numpy.nanmax(numpy.abs(v)):.9g}); in exact arithmetic "
            f"|CKA| <= 1, so this is a numerical problem; please report it with the inputs.",
            CKANumericsWarning,
            stacklevel=3,
        )
