"""The comparer's checks for token features (``CKA(tokens=...)``), framework-neutral.

With ``tokens="all"`` the rows of a batch's Grams are its real tokens, not its examples: the
extractors report how many each sequence has (:meth:`cka.frontends.base.FeatureExtractor.token_counts`),
and the comparer checks here that both sides saw the same tokens before it adds the batch. numpy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_token_sides", "token_rows"]


def token_rows(counts1: Any, counts2: Any, index: int) -> int | None:
    """With ``tokens="all"`` the Grams' rows are real tokens (an extractor reports them per sequence, ``(b,)``
    integer arrays): both sides must have them, the same number per sequence. Returns the batch's
    sequences (None when the rows are the examples); a ValueError that says which side differs."""
    if counts1 is None and counts2 is None:
        return None
    if counts1 is None or counts2 is None:
        raise ValueError(
            f"batch {index}: tokens='all' makes every real token an example on {'model1' if counts2 is None else 'model2'} "
            f"only, so the two sides' Grams have different rows; use it on both sides, or a per-sequence mode."
        )
    counts1, counts2 = np.asarray(counts1), np.asarray(counts2)
    if counts1.shape != counts2.shape or not np.array_equal(counts1, counts2):
        detail = ""
        if counts1.shape == counts2.shape:
            k = int(np.flatnonzero(counts1 != counts2)[0])
            detail = f" (sequence {k}: {counts1[k]} vs {counts2[k]} real tokens)"
        raise ValueError(
            f"batch {index}: with tokens='all' every real token is an example, so both models must see the same real "
            f"tokens, but their masks disagree{detail}: model1 has {counts1.sum()} real tokens in {counts1.size} "
            f"sequences, model2 {counts2.sum()} in {counts2.size}. Two tokenizers that split the text differently "
            f"cannot be compared token by token: use tokens='mean', 'first' or 'last' (one example per sequence), "
            f"or the same tokenizer on both sides."
        )
    return int(counts1.size)


def check_token_sides(adapter1: Any, adapter2: Any) -> None:
    """``CKA(tokens=, mask=)`` configure the extractors ``CKA`` builds for plain models; an extractor
    given ready-made (``TorchModel(model, tokens=...)``) takes its own."""
    given = [what for what, adapter in (("model1", adapter1), ("model2", adapter2)) if adapter is None]
    if given:
        raise TypeError(
            f"tokens= and mask= apply to plain nn.Modules, but {' and '.join(given)} is already a feature extractor; "
            f"give them to it instead (TorchModel(model, tokens=..., mask=...))."
        )
