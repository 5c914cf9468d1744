"""Tiny Hugging Face, timm and torchvision models built from configs with random weights (nothing
downloaded), a word-level tokenizer trained on a few lines, and padded token batches.

Sizes: 2 layers, hidden 32, 2 heads, vocabulary 64: a forward pass of 8 sequences takes about a
millisecond, so the whole transformers test file stays well under a minute on 2 cores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

VOCAB, HIDDEN, LAYERS, HEADS, POSITIONS = 64, 32, 2, 2, 64
PAD = 0  # the pad token id of every tiny text model here

LINES = [
    "the cat sat on the mat",
    "a dog ran after the red ball in the park",
    "the quick brown fox jumps over the lazy dog",
    "hello world",
    "small models keep the tests fast",
    "every real token is an example",
    "padding must never reach the gram",
    "left or right padding gives the same value",
    "one two three four five six seven eight nine ten",
    "cka compares layers",
    "a b c",
    "the end",
]


def bert(dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.nn.Module:
    """``BertModel``: blocks ``encoder.layer.0``, ``encoder.layer.1``."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=POSITIONS,
        pad_token_id=PAD,
    )
    return _build(transformers.BertModel, config, dtype, seed)


def gpt2(dtype: torch.dtype = torch.float32, seed: int = 0, head: bool = False) -> torch.nn.Module:
    """``GPT2Model`` (blocks ``h.0``, ``h.1``) or, with ``head``, ``GPT2LMHeadModel`` (``transformer.h.N``)."""
    import transformers

    config = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=POSITIONS,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=PAD,
    )
    return _build(transformers.GPT2LMHeadModel if head else transformers.GPT2Model, config, dtype, seed)


def llama(dtype: torch.dtype = torch.float32, seed: int = 0, head: bool = False) -> torch.nn.Module:
    """``LlamaModel`` (blocks ``layers.0``, ``layers.1``; grouped-query attention with one KV head) or,
    with ``head``, ``LlamaForCausalLM`` (``model.layers.N``)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=1,
        intermediate_size=2 * HIDDEN,
        max_position_embeddings=POSITIONS,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=PAD,
    )
    return _build(transformers.LlamaForCausalLM if head else transformers.LlamaModel, config, dtype, seed)


def vit(dtype: torch.dtype = torch.float32, seed: int = 0, head: bool = False) -> torch.nn.Module:
    """``ViTModel`` on 16 x 16 images, 8 x 8 patches (4 patches + CLS); blocks ``layers.0``, ``layers.1``
    (transformers 5; 4.x named them ``encoder.layer.N``). ``head``: ``ViTForImageClassification``."""
    import transformers

    config = transformers.ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=2 * HIDDEN,
        num_labels=3,
    )
    return _build(transformers.ViTForImageClassification if head else transformers.ViTModel, config, dtype, seed)


TEXT_MODELS: dict[str, Callable[..., torch.nn.Module]] = {"bert": bert, "gpt2": gpt2, "llama": llama}


def _build(cls: type, config: object, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(config).to(dtype).eval()


def random_sequences(count: int, seed: int = 0, low: int = 2, high: int = 16) -> list[list[int]]:
    """``count`` token-id sequences of random lengths in ``[low, high]``, ids in ``[2, VOCAB)``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in lengths]


def pad_batch(
    sequences: Sequence[Sequence[int]], length: int, side: str = "right", positions: bool = False
) -> dict[str, torch.Tensor]:
    """``{"input_ids", "attention_mask"}`` padded with :data:`PAD` to ``length`` tokens on ``side``.

    ``positions``: also ``position_ids`` counting real tokens from 0 (what ``generate`` passes for a
    left-padded batch; models with absolute position embeddings, such as GPT-2 and BERT, need them
    there, or the real tokens sit at shifted positions).
    """
    ids = torch.full((len(sequences), length), PAD, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        ids[row, span] = torch.tensor(seq)
        mask[row, span] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if positions:
        batch["position_ids"] = (mask.cumsum(1) - 1).clamp(min=0)
    return batch


def padded_batches(
    sequences: Sequence[Sequence[int]],
    batch_size: int,
    length: int | None = None,
    side: str = "right",
    positions: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` sequences, each padded to ``length`` (default: its longest sequence)."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batches.append(pad_batch(chunk, length or max(map(len, chunk)), side, positions))
    return batches


def word_tokenizer(lines: Sequence[str] = LINES, pad: str = "[PAD]") -> object:
    """A word-level ``PreTrainedTokenizerFast`` trained on ``lines`` (the ``tokenizers`` package),
    ``[PAD]`` = 0, ``[UNK]`` = 1; nothing downloaded."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=[pad, "[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, unk_token="[UNK]")


def char_tokenizer(lines: Sequence[str] = LINES) -> object:
    """A character-level tokenizer (a word-level one over single characters): it splits the same
    text into other tokens than :func:`word_tokenizer`, for the tokenizers-disagree error."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.train_from_iterator(lines, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]")


def save_text_model(folder: str, kind: str = "gpt2", seed: int = 0) -> str:
    """Save a tiny model of ``kind`` and :func:`word_tokenizer` to ``folder`` (``save_pretrained``),
    the way a user's local model folder looks; returns the folder."""
    model = TEXT_MODELS[kind](seed=seed)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------------
# timm and torchvision (they import only where a matching torchvision is installed)
# --------------------------------------------------------------------------------------------


def torchvision_missing() -> str | None:
    """Why torchvision cannot be used here (None if it imports)."""
    try:
        import torchvision  # noqa: F401
    except (ImportError, OSError, RuntimeError, AttributeError) as error:  # a wheel for another torch
        return (
            f"torchvision does not import here ({type(error).__name__}: {str(error).splitlines()[0][:80]}); its "
            f"default wheels need the CUDA build of torch. These tests run where it imports (a GPU machine)."
        )
    return None


def timm_missing() -> str | None:
    """Why timm cannot be used here (None if it imports); timm imports torchvision."""
    try:
        import timm  # noqa: F401
    except (ImportError, OSError, RuntimeError, AttributeError) as error:
        return (
            f"timm does not import here ({type(error).__name__}: {str(error).splitlines()[0][:80]}); it needs "
            f"torchvision, whose default wheels need the CUDA build of torch. These tests run where it imports."
        )
    return None
