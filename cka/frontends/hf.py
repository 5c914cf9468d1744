r"""Hugging Face models: ``hidden_states`` capture, local-only loading, and text as batches.

``hidden_states`` capture is an alternative to hooks for ``transformers`` models: the model is
called with ``output_hidden_states=True`` and returns the embedding output and every layer's output,
``L + 1`` tensors of shape ``(batch, tokens, hidden)``. They are selectable as layers named
``hidden_states.0`` (the embeddings) ... ``hidden_states.L`` (the last layer; in GPT-2 and Llama
after the final norm, which the block ``h.{L-1}`` / ``layers.{L-1}`` is not), all at once with
``"hidden_states"``, by exact name or by glob (``"hidden_states.[0-3]"``), and beside hooked
modules in one selection (:func:`cka.frontends.torch.select_layers`). Unlike hooks, the model returns all of them together, so the batch's
``L + 1`` hidden-state tensors are alive at once before their Grams are taken.

Loading (``hf:NAME_OR_PATH`` on the command line) never downloads: ``local_files_only=True``
(and ``HF_HUB_OFFLINE=1`` for anything imported afterwards); a model that is neither a local folder
nor in the local cache is a one-line error saying how to get it there. ``transformers`` is imported
inside the functions only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "HIDDEN_STATES",
    "TextBatches",
    "hidden_state_count",
    "hidden_state_names",
    "hidden_states_of",
    "is_hf_model",
    "is_hidden_state_spec",
    "load_local_model",
    "load_local_tokenizer",
    "read_lines",
]

#: The layer name prefix (and the whole-set selector) of hidden-state capture.
HIDDEN_STATES = "hidden_states"


# --------------------------------------------------------------------------------------------
# hidden_states capture
# --------------------------------------------------------------------------------------------


def is_hf_model(module: Any) -> bool:
    """Whether ``module`` is a ``transformers`` model (a ``PreTrainedModel`` with a ``config``),
    told without importing ``transformers``: by its class hierarchy's names."""
    return hasattr(module, "config") and any(c.__name__ == "PreTrainedModel" for c in type(module).__mro__)


def hidden_state_count(module: Any) -> int:
    """``L + 1``: how many hidden states the model returns (embeddings, then one per layer).

    Read from ``config.num_hidden_layers`` (the text config of multimodal models).

    Raises
    ------
    ValueError
        Not a ``transformers`` model, or its config has no layer count.
    """
    if not is_hf_model(module):
        raise ValueError(
            f"'hidden_states' layers need a Hugging Face transformers model (called with output_hidden_states=True); "
            f"{type(module).__name__} is not one. Select its modules by name instead."
        )
    config = module.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    layers = getattr(config, "num_hidden_layers", None)
    if layers is None:
        raise ValueError(
            f"{type(module).__name__}'s config has no num_hidden_layers, so its hidden states cannot be named; "
            f"select its blocks by module name instead."
        )
    return int(layers) + 1


def hidden_state_names(module: Any) -> list[str]:
    """``["hidden_states.0", ..., "hidden_states.L"]`` for a ``transformers`` model."""
    return [f"{HIDDEN_STATES}.{i}" for i in range(hidden_state_count(module))]


def is_hidden_state_spec(spec: Any) -> bool:
    """Whether a layer-selection entry names hidden states: ``"hidden_states"``, or a name or glob
    starting with ``"hidden_states."``."""
    return isinstance(spec, str) and (spec == HIDDEN_STATES or spec.startswith(HIDDEN_STATES + "."))


def hidden_states_of(output: Any, expected: int, model: str) -> Sequence[Any]:
    """The ``hidden_states`` tuple of a model output (``ModelOutput``, dict or object).

    Raises
    ------
    ValueError
        The output has no hidden states, or not the ``expected`` number (the config's layer count + 1).
    """
    states = output.get(HIDDEN_STATES) if isinstance(output, Mapping) else getattr(output, HIDDEN_STATES, None)
    if states is None:
        raise ValueError(
            f"{model} returned no hidden_states although it was called with output_hidden_states=True; "
            f"select its blocks by module name instead (encoder-decoder models return encoder_/decoder_hidden_states)."
        )
    if len(states) != expected:
        raise ValueError(
            f"{model} returned {len(states)} hidden states, but its config promises {expected} "
            f"(num_hidden_layers + 1); select its blocks by module name instead."
        )
    return states


# --------------------------------------------------------------------------------------------
# Local-only loading
# --------------------------------------------------------------------------------------------


def _offline() -> None:
    """Make every later Hugging Face Hub access local-only (what ``local_files_only`` does per call)."""
    os.environ["HF_HUB_OFFLINE"] = "1"


def _not_local(name: str, what: str) -> ValueError:
    return ValueError(
        f"hf:{name}: no {what} in a local folder {name!r} nor in the local Hugging Face cache, and cka never "
        f"downloads; save it to a folder (save_pretrained) or fetch it once with `hf download {name}`, then pass "
        f"hf:PATH."
    )


def load_local_model(name: str) -> Any:
    """``transformers.AutoModel.from_pretrained(name, local_files_only=True)`` in eval mode.

    Parameters
    ----------
    name : str
        A folder written by ``save_pretrained`` or a Hub id already in the local cache.

    Raises
    ------
    ImportError
        ``transformers`` is not installed (with the pip line).
    ValueError
        Neither a local folder nor cached (one line, with the fix).
    """
    _offline()
    try:
        import transformers
    except ImportError:
        raise ImportError("hf:NAME needs transformers: pip install transformers") from None
    transformers.utils.logging.disable_progress_bar()
    try:
        model = transformers.AutoModel.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as error:
        if Path(name).is_dir():
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"hf:{name}: cannot load a transformers model from this folder: {first}") from None
        raise _not_local(name, "model") from None
    return model.eval()


def load_local_tokenizer(name: str) -> Any:
    """``transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)``, ready to pad.

    A tokenizer without a pad token (GPT-2's) pads with its end-of-sequence token, as is usual; the
    attention mask marks those positions as padding either way.

    Raises
    ------
    ValueError
        No tokenizer there, or one with neither a pad nor an end-of-sequence token.
    """
    _offline()
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError, TypeError):
        raise _not_local(name, "tokenizer") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"hf:{name}: its tokenizer has no pad token and no end-of-sequence token to pad with; "
                f"set tokenizer.pad_token and save_pretrained it again."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --------------------------------------------------------------------------------------------
# Text data
# --------------------------------------------------------------------------------------------


def read_lines(path: str | os.PathLike, limit: int | None = None) -> list[str]:
    """The non-empty lines of a UTF-8 text file (stripped), at most ``limit``.

    Raises
    ------
    FileNotFoundError, ValueError
        A missing file, or one without a non-empty line.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"text data {path} does not exist; give a .txt file with one text per line.")
    lines = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"text data {path} holds no non-empty line; write one text per line.")
    return lines[:limit] if limit is not None else lines


class TextBatches:
    """Lines of text as tokenized batches: dicts of ``input_ids``, ``attention_mask`` (and whatever
    else the tokenizer returns), padded to the longest line of each batch, truncated to
    ``max_length`` tokens. Iterating twice gives the same batches; ``len`` is the number of batches.

    Parameters
    ----------
    lines : sequence of str
    tokenizer : a ``transformers`` tokenizer
    batch_size : int
    max_length : int, optional
        Truncate longer texts to this many tokens (default: the tokenizer's ``model_max_length``).
    """

    def __init__(self, lines: Sequence[str], tokenizer: Any, batch_size: int, max_length: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive; got {batch_size}.")
        if max_length is not None and max_length < 1:
            raise ValueError(f"--max-length must be a positive number of tokens; got {max_length}.")
        self.lines, self.tokenizer = list(lines), tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    def __len__(self) -> int:
        return math.ceil(len(self.lines) / self.batch_size)

    def __iter__(self) -> Any:
        for start in range(0, len(self.lines), self.batch_size):
            chunk = self.lines[start : start + self.batch_size]
            encoded = self.tokenizer(
                chunk,
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            )
            yield dict(encoded)

    def __repr__(self) -> str:
        return f"TextBatches({len(self.lines)} lines, batch_size={self.batch_size}, max_length={self.max_length})"
