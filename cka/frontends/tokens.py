r"""Token features: a layer's ``(batch, tokens, ...)`` output as CKA examples, padding excluded.

A transformer layer gives one vector per token; CKA needs one row per example. Four ways to get
there (``tokens=`` on :class:`cka.CKA` and :class:`cka.frontends.torch.TorchModel`), each reading
only the *real* tokens, those where the batch's ``attention_mask`` is 1:

==========  ===================================================  ==============================
``tokens``  example                                              rows of the Gram per batch
==========  ===================================================  ==============================
``"mean"``  mean over the sequence's real tokens                 one per sequence
``"first"`` the first real token (BERT's ``[CLS]``)              one per sequence
``"last"``  the last real token (causal LMs), right- or left-    one per sequence
            padded alike
``"all"``   every real token (Kornblith et al. 2019, appx. F)    the batch's real tokens
==========  ===================================================  ==============================

Why it matters: a plain mean over the token axis (``reduce="b t d -> b d"``) mixes the pad
positions' vectors into every padded sequence, in proportion to its padding, so the same sentences
score differently depending on how they were batched. Here padding never reaches the Gram: pad
positions are dropped (``"all"``), skipped (``"first"``, ``"last"``) or zeroed by ``torch.where``
before the sum (``"mean"``, so even NaN at a pad position is harmless).

The real-token layout of a batch (:class:`TokenLayout`) is computed once per batch from its mask
and shared by every layer, so a layer's reduction is a gather or one masked sum with no host
synchronisation. Without a mask every token counts as real.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from einops import rearrange

__all__ = [
    "TOKEN_MODES",
    "NoTokenMaskWarning",
    "TokenLayout",
    "check_mask",
    "check_real_tokens",
    "check_token_mode",
    "find_mask",
    "first_token",
    "last_token",
    "masked_mean",
    "move_layout",
    "real_tokens",
    "reduce_tokens",
    "token_layout",
]

#: The values ``tokens=`` takes.
TOKEN_MODES = ("mean", "first", "last", "all")


class NoTokenMaskWarning(UserWarning):
    """``tokens=`` is set, the model gets ``input_ids``, and there is no mask: every token counts as
    real, padding included."""


class TokenLayout(NamedTuple):
    """Where the real tokens of one batch are; built by :func:`token_layout` from a ``(b, t)`` mask.

    Attributes
    ----------
    mask : (b, t) bool tensor
        True at real tokens.
    counts : (b,) int64 tensor
        Real tokens per sequence.
    first, last : (b,) int64 tensors
        Token index of each sequence's first and last real token (0 for a sequence without one).
    flat_index : (N,) int64 tensor
        Positions of the ``N = counts.sum()`` real tokens in the flattened ``(b * t)`` token axis,
        sequence by sequence, tokens in order.
    """

    mask: torch.Tensor
    counts: torch.Tensor
    first: torch.Tensor
    last: torch.Tensor
    flat_index: torch.Tensor


def check_token_mode(tokens: Any, what: str = "tokens") -> str | None:
    """``tokens`` if it is ``None`` or one of :data:`TOKEN_MODES`; otherwise a ``ValueError``.

    Parameters
    ----------
    tokens : object
    what : str
        The argument's name in the error (``"tokens"``, ``"tokens['h.0']"``).
    """
    if tokens is None or (isinstance(tokens, str) and tokens in TOKEN_MODES):
        return tokens
    raise ValueError(
        f"{what} must be one of {', '.join(map(repr, TOKEN_MODES))} (or None for no token handling); got {tokens!r}."
    )


def check_mask(mask: Any, what: str = "mask") -> torch.Tensor:
    """A token mask as a ``(b, t)`` bool tensor, checked: 2-D, values 0/1 (or bool).

    Parameters
    ----------
    mask : (b, t) tensor or array-like
        1 (True) at real tokens, 0 (False) at padding, as Hugging Face's ``attention_mask``.
    what : str
        Where the mask came from, for errors.

    Raises
    ------
    ValueError
        A mask that is not 2-D or holds values other than 0 and 1 (a 4-D additive attention mask,
        say), with its shape and the fix.
    """
    mask = torch.as_tensor(mask)
    if mask.dim() != 2:
        raise ValueError(
            f"{what} must be a (batch, tokens) tensor of 0/1 (1 = real token, as a tokenizer's attention_mask); "
            f"got shape {tuple(mask.shape)}. Pass mask=lambda batch: ... returning such a tensor."
        )
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"{what} must hold only 0 and 1 (1 = real token); got values {torch.unique(mask)[:6].tolist()}. "
                f"Pass mask=lambda batch: ... returning a 0/1 (batch, tokens) tensor."
            )
        mask = mask != 0
    return mask


def token_layout(mask: torch.Tensor) -> TokenLayout:
    r"""The real-token layout of a batch from its ``(b, t)`` bool mask (see :func:`check_mask`).

    ``first`` is the first index where the mask is true (``argmax`` of a bool row returns the first
    maximum), ``last`` the same counted from the end: :math:`t - 1 - \operatorname{argmax}(\text{flip}(m))`,
    which serves right- and left-padded batches alike.

    Parameters
    ----------
    mask : (b, t) bool tensor

    Returns
    -------
    TokenLayout
        On the mask's device.
    """
    as_int = mask.to(torch.int8)  # argmax has no bool kernel
    first = as_int.argmax(dim=1)
    last = mask.shape[1] - 1 - as_int.flip(1).argmax(dim=1)
    return TokenLayout(
        mask=mask,
        counts=mask.sum(dim=1),
        first=first,
        last=last,
        flat_index=torch.nonzero(mask.reshape(-1)).reshape(-1),
    )


def check_real_tokens(layout: TokenLayout, modes: Sequence[str | None], source: str) -> None:
    """``"mean"``, ``"first"`` and ``"last"`` need a real token in every sequence; ``"all"`` does not.

    A value check (one host synchronisation per batch), done once per batch at the boundary.

    Raises
    ------
    ValueError
        A sequence without a real token, with its index and the mask's source.
    """
    per_sequence = [m for m in modes if m in ("mean", "first", "last")]
    if not per_sequence:
        return
    empty = torch.nonzero(layout.counts == 0).reshape(-1)
    if empty.numel():
        raise ValueError(
            f"sequence {int(empty[0])} of the batch has no real token in {source} (all padding), so "
            f"tokens={per_sequence[0]!r} has nothing to take; drop empty texts from the data."
        )


def move_layout(layout: TokenLayout, device: torch.device) -> TokenLayout:
    """``layout`` on ``device`` (the same object if it is already there)."""
    if layout.mask.device == device:
        return layout
    return TokenLayout(*(t.to(device, non_blocking=True) for t in layout))


def masked_mean(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    r"""Mean over each sequence's real tokens: :math:`\frac{1}{|S_i|}\sum_{t \in S_i} x_{it}`.

    Pad positions are replaced by 0 with ``torch.where`` (not multiplied by 0), so NaN or Inf at a
    pad position never reaches the sum. The sum runs in at least float32 (a bf16 sum over hundreds of
    tokens loses most of its bits).

    Parameters
    ----------
    x : (b, t, d) tensor
    layout : TokenLayout
        Every sequence must have a real token (checked by the caller, outside any trace).

    Returns
    -------
    (b, d) tensor, dtype ``promote_types(x.dtype, float32)``.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    kept = torch.where(layout.mask[:, :, None], x.to(dtype), torch.zeros((), dtype=dtype, device=x.device))
    return kept.sum(dim=1) / layout.counts[:, None].to(dtype)


def first_token(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Each sequence's first real token (``[CLS]`` for BERT-style models), left padding skipped.

    Parameters
    ----------
    x : (b, t, d) tensor
    layout : TokenLayout

    Returns
    -------
    (b, d) tensor
    """
    return x[torch.arange(x.shape[0], device=x.device), layout.first]


def last_token(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Each sequence's last real token (the next-token state of a causal LM), right padding skipped.

    Parameters
    ----------
    x : (b, t, d) tensor
    layout : TokenLayout

    Returns
    -------
    (b, d) tensor
    """
    return x[torch.arange(x.shape[0], device=x.device), layout.last]


def real_tokens(x: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Every real token as an example: the rows of ``x`` where the mask is true, sequence by sequence.

    Parameters
    ----------
    x : (b, t, d) tensor
    layout : TokenLayout

    Returns
    -------
    (N, d) tensor, ``N = layout.counts.sum()``.
    """
    return rearrange(x, "b t d -> (b t) d").index_select(0, layout.flat_index)


_REDUCTIONS: dict[str, Callable[[torch.Tensor, TokenLayout], torch.Tensor]] = {
    "mean": masked_mean,
    "first": first_token,
    "last": last_token,
    "all": real_tokens,
}


def reduce_tokens(x: torch.Tensor, layout: TokenLayout | None, mode: str, layer: str = "") -> torch.Tensor:
    """A layer's ``(b, t, ...)`` output reduced to CKA examples by ``mode`` (see the module docstring).

    Parameters
    ----------
    x : (b, t, ...) tensor
        Trailing axes are flattened into one feature axis.
    layout : TokenLayout or None
        The batch's real tokens; ``None``: every token is real.
    mode : {"mean", "first", "last", "all"}
    layer : str
        The layer's name, for errors.

    Returns
    -------
    (b, d) tensor, or (N, d) for ``"all"``.

    Raises
    ------
    ValueError
        An output with fewer than 3 axes, or whose first two axes are not the mask's ``(b, t)``.
    """
    if x.dim() < 3:
        raise ValueError(
            f"layer {layer!r}: tokens={mode!r} needs a (batch, tokens, features) output; got shape {tuple(x.shape)}. "
            f"Select a token layer, or turn token handling off for this one with tokens={{...: None}}."
        )
    if layout is not None and tuple(x.shape[:2]) != tuple(layout.mask.shape):
        raise ValueError(
            f"layer {layer!r}: its output of shape {tuple(x.shape)} does not start with the mask's (batch, tokens) "
            f"= {tuple(layout.mask.shape)}; tokens={mode!r} needs the token axis second. Pick the tensor with output= "
            f"or the mask with mask=."
        )
    x = x.reshape(*x.shape[:2], -1)
    if layout is None:
        layout = token_layout(torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
    return _REDUCTIONS[mode](x, move_layout(layout, x.device))


def find_mask(
    batch: Any, kwargs: Mapping[str, Any], mask: Callable[[Any], Any] | None
) -> tuple[torch.Tensor | None, str]:
    """The token mask of a batch and where it came from.

    Parameters
    ----------
    batch : object
        The batch as the loader gave it.
    kwargs : mapping
        The keyword arguments the model is called with (from a dict batch or ``inputs=``).
    mask : callable or None
        The user's ``batch -> (b, t) mask``; when given it wins.

    Returns
    -------
    mask : (b, t) bool tensor or None
        ``None`` when there is no mask: every token counts as real.
    source : str
        ``"mask="``, ``"attention_mask"`` or ``""``.
    """
    if mask is not None:
        return check_mask(mask(batch), "mask(batch)"), "mask="
    found = kwargs.get("attention_mask")
    if found is None:
        return None, ""
    return check_mask(found, "the batch's attention_mask"), "attention_mask"
