"""Transformers for real: Hugging Face BERT, GPT-2, Llama and ViT built from configs (random weights,
nothing downloaded), token features that never see padding, ``hidden_states`` capture, half-precision
models, the ``hf:`` command line; timm and torchvision where they import.

Padding invariance is tested in float32: the same sentences padded to other lengths, or on the other
side, move CKA by at most 4e-8 here (measured; the bound asserted is 1e-5).
"""

from __future__ import annotations

import copy
import warnings

import hf_models as hf  # tests/ is on sys.path
import numpy as np
import pytest
import torch
import transformers  # noqa: F401  (required in the test set-up: a missing one fails, never skips)

from cka import CKA
from cka.frontends import tokens as tk
from cka.frontends.torch import TorchModel, default_layers

MODES = ("mean", "first", "last", "all")
SEQUENCES = hf.random_sequences(16, seed=1)  # lengths 2..16, two batches of 8


def compare(m1, m2, batches, **kwargs):
    return CKA(m1, m2, progress=False, **kwargs).compare(batches)


# --------------------------------------------------------------------------------------------
# The token math (cka.frontends.tokens)
# --------------------------------------------------------------------------------------------


def _toy(side: str = "right"):
    """3 sequences of 2, 4 and 1 real tokens in 5 positions; pad positions hold NaN."""
    lengths = [2, 4, 1]
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    for row, n in enumerate(lengths):
        span = slice(0, n) if side == "right" else slice(5 - n, 5)
        mask[row, span] = True
    x = x.masked_fill(~mask[:, :, None], float("nan"))
    return x, mask, lengths


@pytest.mark.parametrize("side", ["right", "left"])
def test_token_reductions_read_only_real_tokens(side):
    x, mask, lengths = _toy(side)
    layout = tk.token_layout(mask)
    real = [x[row][mask[row]] for row in range(3)]  # (n_i, d) per sequence, in order
    assert layout.counts.tolist() == lengths
    torch.testing.assert_close(tk.masked_mean(x, layout), torch.stack([r.mean(0) for r in real]))
    torch.testing.assert_close(tk.first_token(x, layout), torch.stack([r[0] for r in real]))
    torch.testing.assert_close(tk.last_token(x, layout), torch.stack([r[-1] for r in real]))
    torch.testing.assert_close(tk.real_tokens(x, layout), torch.cat(real))
    for mode in MODES:  # NaN at every pad position, none in any result
        assert torch.isfinite(tk.reduce_tokens(x, layout, mode)).all()


def test_reduce_tokens_flattens_trailing_axes_and_defaults_to_every_token():
    x = torch.randn(2, 3, 4, 5)
    assert tk.reduce_tokens(x, None, "all").shape == (6, 20)
    torch.testing.assert_close(tk.reduce_tokens(x, None, "mean"), x.mean(1).reshape(2, 20))
    torch.testing.assert_close(tk.reduce_tokens(x, None, "last"), x[:, -1].reshape(2, 20))


def test_masked_mean_of_half_precision_sums_in_float32():
    x = torch.full((1, 300, 2), 1.0 + 2**-7, dtype=torch.bfloat16)  # a bf16 running sum would drift
    out = tk.masked_mean(x, tk.token_layout(torch.ones(1, 300, dtype=torch.bool)))
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 1.0 + 2**-7))


def test_token_errors_say_what_and_how():
    with pytest.raises(ValueError, match="tokens must be one of 'mean', 'first', 'last', 'all'"):
        tk.check_token_mode("cls")
    with pytest.raises(ValueError, match=r"\(batch, tokens\).*got shape \(2, 1, 1, 3\)"):
        tk.check_mask(torch.ones(2, 1, 1, 3))
    with pytest.raises(ValueError, match=r"only 0 and 1.*\[0, 2\]"):
        tk.check_mask(torch.tensor([[0, 2]]))
    layout = tk.token_layout(torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"layer 'fc'.*\(batch, tokens, features\).*\(2, 3\)"):
        tk.reduce_tokens(torch.ones(2, 3), layout, "mean", "fc")
    with pytest.raises(ValueError, match=r"does not start with the mask's \(batch, tokens\) = \(2, 3\)"):
        tk.reduce_tokens(torch.ones(2, 4, 5), layout, "mean", "h.0")
    empty = tk.token_layout(torch.tensor([[True, True], [False, False]]))
    with pytest.raises(ValueError, match="sequence 1 of the batch has no real token in attention_mask"):
        tk.check_real_tokens(empty, ["mean"], "attention_mask")
    tk.check_real_tokens(empty, ["all"], "attention_mask")  # nothing to take is fine for every-token


def test_the_comparer_checks_both_sides_saw_the_same_tokens():
    from cka._token_rows import token_rows

    assert token_rows(None, None, 0) is None
    assert token_rows(np.array([2, 4]), np.array([2, 4]), 0) == 2
    with pytest.raises(ValueError, match=r"batch 3: .*sequence 1: 4 vs 5 real tokens.*tokenizers that split"):
        token_rows(np.array([2, 4]), np.array([2, 5]), 3)
    with pytest.raises(ValueError, match=r"batch 1: tokens='all' makes every real token an example on model2 only"):
        token_rows(None, np.array([2, 4]), 1)


def test_find_mask_prefers_the_callable_then_the_attention_mask():
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
    mask, source = tk.find_mask(batch, batch, None)
    assert source == "attention_mask" and mask.dtype == torch.bool and mask.sum() == 5
    mask, source = tk.find_mask(batch, batch, lambda b: b["input_ids"])
    assert source == "mask=" and bool(mask.all())
    assert tk.find_mask(batch, {}, None) == (None, "")


# --------------------------------------------------------------------------------------------
# Real models: default layers, outputs, dict batches
# --------------------------------------------------------------------------------------------

DEFAULTS = {
    "bert": (lambda: hf.bert(), ["encoder.layer.0", "encoder.layer.1"]),
    "gpt2": (lambda: hf.gpt2(), ["h.0", "h.1"]),
    "gpt2-lm": (lambda: hf.gpt2(head=True), ["transformer.h.0", "transformer.h.1"]),
    "llama": (lambda: hf.llama(), ["layers.0", "layers.1"]),
    "llama-lm": (lambda: hf.llama(head=True), ["model.layers.0", "model.layers.1"]),
    "vit": (lambda: hf.vit(), ["layers.0", "layers.1"]),
    "vit-cls": (lambda: hf.vit(head=True), ["vit.layers.0", "vit.layers.1"]),
}


@pytest.mark.parametrize("name", list(DEFAULTS))
def test_default_layers_are_the_transformer_blocks(name):
    build, expected = DEFAULTS[name]
    assert default_layers(build()) == expected


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_text_models_compare_on_dict_batches_with_model_outputs(kind):
    """Blocks (tensors or tuples) and the whole model (a ModelOutput) on ``{"input_ids", "attention_mask"}``."""
    build = hf.TEXT_MODELS[kind]
    m1, m2 = build(seed=0), build(seed=1)
    batches = hf.padded_batches(SEQUENCES, 8)
    layers = [*default_layers(m1), ""]  # "" = the model itself: its ModelOutput's last_hidden_state
    result = compare(m1, m2, batches, model1_layers=layers, model2_layers=layers, tokens="mean")
    assert result.matrix.shape == (3, 3) and np.isfinite(result.matrix).all()
    assert result.n_examples == 16 and result.settings["n_sequences"] == 16
    itself = compare(m1, copy.deepcopy(m1), batches, tokens="all")
    np.testing.assert_allclose(np.diag(itself.matrix), 1.0, atol=1e-6)


def test_vit_on_images_and_its_classifier_output():
    m1, m2 = hf.vit(seed=0), hf.vit(seed=1, head=True)
    images = [torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    blocks = compare(m1, m2, images, tokens="first")  # the CLS token of each block
    assert blocks.matrix.shape == (2, 2) and blocks.n_examples == 16
    logits = compare(m1, m2, images, model1_layers=["layers.1"], model2_layers=[""], tokens={"layers.1": "first"})
    assert logits.matrix.shape == (1, 1) and np.isfinite(logits.matrix).all()  # ImageClassifierOutput.logits


# --------------------------------------------------------------------------------------------
# Token features on real models: padding never matters
# --------------------------------------------------------------------------------------------

PADDINGS = {  # (length, side, position_ids): how the same 16 sentences are batched
    "bert": [(None, "right", False), (24, "right", False), (None, "left", True), (30, "left", True)],
    "gpt2": [(None, "right", False), (24, "right", False), (None, "left", True), (30, "left", True)],
    # Llama's rotary embeddings are relative: left padding needs no position_ids
    "llama": [(None, "right", False), (24, "right", False), (None, "left", False), (30, "left", False)],
}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("mode", MODES)
def test_padding_length_and_side_do_not_change_cka(kind, mode):
    build = hf.TEXT_MODELS[kind]
    m1, m2 = build(seed=0), build(seed=1)
    results = [
        compare(m1, m2, hf.padded_batches(SEQUENCES, 8, length, side, positions), tokens=mode)
        for length, side, positions in PADDINGS[kind]
    ]
    for other in results[1:]:
        np.testing.assert_allclose(other.matrix, results[0].matrix, rtol=0, atol=1e-5)
        assert other.n_examples == results[0].n_examples
    real = sum(map(len, SEQUENCES))
    assert results[0].n_examples == (real if mode == "all" else 16)
    assert results[0].settings["n_sequences"] == 16 and results[0].settings["tokens"] == mode


def test_a_plain_mean_over_tokens_depends_on_the_padding():
    """The pitfall tokens= removes: reduce="b t d -> b d" averages the pad positions in."""
    m1, m2 = hf.bert(seed=0), hf.bert(seed=1)
    short, long = (hf.padded_batches(SEQUENCES, 8, length) for length in (None, 24))
    plain = [compare(m1, m2, b, reduce="b t d -> b d").matrix for b in (short, long)]
    masked = [compare(m1, m2, b, tokens="mean").matrix for b in (short, long)]
    assert np.abs(plain[0] - plain[1]).max() > 1e-3  # measured 4e-3: the batching changes the value
    assert np.abs(plain[0] - masked[0]).max() > 0.1  # measured 0.60: the pad vectors dominate the mean
    assert np.abs(masked[0] - masked[1]).max() < 1e-5


def test_every_token_counts_real_tokens_only():
    m1, m2 = hf.gpt2(seed=0), hf.llama(seed=1)
    batches = hf.padded_batches(SEQUENCES, 8, 24)
    result = compare(m1, m2, batches, tokens="all")
    assert result.n_examples == sum(map(len, SEQUENCES)) < 16 * 24
    assert result.settings["n_sequences"] == 16


def test_tokenizers_that_disagree_are_refused_for_every_token():
    words, chars = hf.word_tokenizer(), hf.char_tokenizer()
    lines = hf.LINES[:8]
    batches1 = [dict(words(lines, padding=True, return_tensors="pt"))]
    batches2 = [dict(chars(lines, padding=True, return_tensors="pt"))]
    m1, m2 = hf.gpt2(seed=0), hf.llama(seed=1)
    with pytest.raises(ValueError, match=r"batch 0: with tokens='all'.*same real tokens.*split the text differently"):
        CKA(m1, m2, tokens="all", progress=False).compare(batches1, batches2)
    per_sentence = CKA(m1, m2, tokens="last", progress=False).compare(batches1, batches2)  # one row per sentence
    assert per_sentence.n_examples == 8


def test_mask_callable_and_per_layer_modes():
    m1, m2 = hf.gpt2(seed=0), hf.gpt2(seed=1)
    batches = hf.padded_batches(SEQUENCES, 8, 24)
    by_key = compare(m1, m2, batches, tokens="mean")
    plain_batches = [(b["input_ids"], b["attention_mask"]) for b in batches]  # tuples: no attention_mask kwarg
    by_callable = compare(
        m1,
        m2,
        plain_batches,
        tokens="mean",
        mask=lambda b: b[1],
        inputs=lambda b: {"input_ids": b[0], "attention_mask": b[1]},
    )
    np.testing.assert_allclose(by_callable.matrix, by_key.matrix, atol=1e-12)
    mixed = compare(m1, m2, batches, tokens={"h.0": "first", "h.1": "last"})
    assert mixed.settings["tokens"] == {"h.0": "first", "h.1": "last"}
    first = compare(m1, m2, batches, model1_layers=["h.0"], model2_layers=["h.0"], tokens="first").matrix
    assert mixed.matrix[0, 0] == pytest.approx(first[0, 0], abs=1e-12)


def test_token_options_on_torch_model_sides():
    m1, m2 = hf.bert(seed=0), hf.gpt2(seed=1)
    batches = hf.padded_batches(SEQUENCES, 8, 24)
    sides = CKA(TorchModel(m1, tokens="first"), TorchModel(m2, tokens="last"), progress=False).compare(batches)
    assert sides.matrix.shape == (2, 2) and sides.n_examples == 16


def test_token_option_errors():
    m1, m2 = hf.gpt2(seed=0), hf.gpt2(seed=1)
    batches = hf.padded_batches(SEQUENCES, 8)
    with pytest.raises(ValueError, match="tokens must be one of"):
        CKA(m1, m2, tokens="cls")
    with pytest.raises(ValueError, match=r"tokens='all'.*must apply to every selected layer"):
        CKA(m1, m2, tokens={"h.0": "all", "h.1": "mean"})
    with pytest.raises(TypeError, match=r"model1 is already a feature extractor; give them to it instead"):
        CKA(TorchModel(m1), m2, tokens="mean")
    one_sided = CKA(TorchModel(m1, tokens="all"), TorchModel(m2, tokens="mean"), progress=False)
    with pytest.raises(ValueError, match=r"batch 0: tokens='all' makes every real token an example on model1 only"):
        one_sided.compare(batches)
    with pytest.raises(ValueError, match=r"both tokens= and reduce="):
        TorchModel(m1, tokens="mean", reduce="b t d -> b d")
    with pytest.raises(ValueError, match=r"tokens names layer\(s\) \['h.7'\]"):
        CKA(m1, m2, tokens={"h.7": "mean"})
    with pytest.raises(TypeError, match="mask must be a callable"):
        TorchModel(m1, tokens="mean", mask="attention_mask")
    one = {"model1_layers": ["wte"], "model2_layers": ["wte"], "tokens": "mean"}
    with pytest.raises(
        ValueError, match=r"layer 'wte': tokens='mean' needs a \(batch, tokens, features\) output; got shape \(8, 32\)"
    ):
        compare(m1, m2, batches, output=lambda o: o[:, 0], **one)
    with pytest.raises(
        ValueError, match=r"layer 'wte': its output of shape \(16, 8, 32\) does not start with the mask's"
    ):
        compare(m1, m2, batches, output=lambda o: o.transpose(0, 1), **one)
    empty = hf.pad_batch([[3, 4], [5, 6], [7], [8, 9, 10]], 4)
    empty["attention_mask"][2] = 0
    with pytest.raises(ValueError, match="sequence 2 of the batch has no real token"):
        compare(m1, m2, [empty], tokens="mean")


def test_no_mask_means_every_token_is_real_with_a_warning():
    m1, m2 = hf.gpt2(seed=0), hf.gpt2(seed=1)
    batches = [{"input_ids": b["input_ids"]} for b in hf.padded_batches(SEQUENCES, 8, 20)]
    with pytest.warns(tk.NoTokenMaskWarning, match="every token counts as real, padding included"):
        result = compare(m1, m2, batches, tokens="all")
    assert result.n_examples == 16 * 20 and result.settings["n_sequences"] == 16
    images = [torch.randn(8, 3, 16, 16)]
    with warnings.catch_warnings():  # pixel inputs have no padding: no warning
        warnings.simplefilter("error", tk.NoTokenMaskWarning)
        assert compare(hf.vit(seed=0), hf.vit(seed=1), images, tokens="all").n_examples == 8 * 5


# --------------------------------------------------------------------------------------------
# hidden_states capture
# --------------------------------------------------------------------------------------------


def test_hidden_states_are_layers_named_by_index():
    m1 = hf.gpt2(seed=0)
    names = [f"hidden_states.{i}" for i in range(3)]
    assert TorchModel(m1, "hidden_states").layer_names() == names
    assert TorchModel(m1, ["hidden_states.2", "hidden_states.0"]).layer_names() == [
        "hidden_states.2",
        "hidden_states.0",
    ]
    assert TorchModel(m1, ["hidden_states.[01]", "h.1"]).layer_names() == [*names[:2], "h.1"]
    with pytest.raises(
        ValueError,
        match=r"no layer named 'hidden_states.5'; close matches: \['hidden_states.2'.*\(and hidden_states.0 \.\.\. hidden_states.2\)",
    ):
        TorchModel(m1, "hidden_states.5")
    with pytest.raises(ValueError, match=r"'hidden_states.\[78\]' selects no layer"):
        TorchModel(m1, "hidden_states.[78]")
    with pytest.raises(ValueError, match="need a Hugging Face transformers model"):
        TorchModel(torch.nn.Sequential(torch.nn.Linear(2, 2)), "hidden_states")


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_hidden_states_equal_the_hooked_blocks(kind):
    """hidden_states.{i+1} is block i's output (the last one after GPT-2's / Llama's final norm)."""
    m1 = hf.TEXT_MODELS[kind](seed=0)
    blocks = default_layers(m1)
    batches = hf.padded_batches(SEQUENCES, 8)
    result = compare(m1, m1, batches, model1_layers="hidden_states", model2_layers=blocks, tokens="all")
    assert result.model1_layers == ("hidden_states.0", "hidden_states.1", "hidden_states.2")
    assert result.matrix[1, 0] == pytest.approx(1.0, abs=1e-6)
    last = result.matrix[2, 1]
    if kind == "bert":
        assert last == pytest.approx(1.0, abs=1e-6)
    else:  # a final RMSNorm / LayerNorm rescales each token: close to, but not, the block's output
        assert 0.5 < last < 1.0 - 1e-6


def test_hidden_states_on_a_model_with_a_head_and_with_tokens_per_layer():
    m1, m2 = hf.llama(seed=0, head=True), hf.gpt2(seed=1)
    batches = hf.padded_batches(SEQUENCES, 8)
    result = compare(
        m1, m2, batches, model1_layers="hidden_states", model2_layers=["hidden_states.2", "h.0"], tokens="last"
    )
    assert result.matrix.shape == (3, 2) and np.isfinite(result.matrix).all()


# --------------------------------------------------------------------------------------------
# Half precision
# --------------------------------------------------------------------------------------------

# Largest |CKA - CKA of the float64 forward pass| measured over BERT, GPT-2 and Llama (the tiny
# models here, two of each with other seeds, every hidden state, 32 sequences in batches of 16):
# bf16 9.4e-4, fp16 1.7e-4 (tokens="mean"; "all": 2.5e-4 and 3.4e-5), float32 4.4e-8. Of that, the
# Gram's share (float32 Gram vs float64 Gram on the same half-precision features) is at most 3.4e-8:
# the rest is the half-precision forward pass itself. A Gram computed in bf16 would add up to 1.2e-3.
HALF_BOUNDS = {torch.bfloat16: 3e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("mode", ["mean", "all"])
def test_half_precision_models_against_a_float64_forward_pass(dtype, kind, mode):
    build = hf.TEXT_MODELS[kind]
    batches = hf.padded_batches(hf.random_sequences(32, seed=1), 16)
    layers = {"model1_layers": "hidden_states", "model2_layers": "hidden_states", "tokens": mode}
    exact = compare(build(torch.float64, 0), build(torch.float64, 1), batches, **layers).matrix
    half1, half2 = build(dtype, 0), build(dtype, 1)
    half = compare(half1, half2, batches, **layers).matrix
    assert np.abs(half - exact).max() < HALF_BOUNDS[dtype]
    # the Gram's own share: the same half-precision features, Grams in float64
    features = [
        [[f.double() for f in TorchModel(m, "hidden_states", tokens=mode).features(b).values()] for b in batches]
        for m in (half1, half2)
    ]
    from cka import minibatch_cka_matrix

    same_features = np.asarray(minibatch_cka_matrix(*features))
    assert np.abs(half - same_features).max() < 2e-7


def test_half_precision_features_get_a_float32_gram():
    """The dtype rule the hooks use (cka.core.gram): a bf16 / fp16 layer's Gram product runs in float32."""
    from cka.core import gram

    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) + 3.0
    for dtype in (torch.bfloat16, torch.float16):
        half = x.to(dtype)
        exact = gram(half.double())  # the same half-precision values, product in float64
        centred = (half - half.float().mean(0).to(dtype)).to(dtype)
        in_half = (centred @ centred.T).double()  # what a product in the half dtype would give
        error = float((gram(half) - exact).abs().max() / exact.abs().max())
        assert gram(half).dtype == torch.float64
        assert error < 1e-6 < float((in_half - exact).abs().max() / exact.abs().max())


# --------------------------------------------------------------------------------------------
# torchvision and timm (run where they import: their default wheels need the CUDA build of torch)
# --------------------------------------------------------------------------------------------

needs_torchvision = pytest.mark.skipif(hf.torchvision_missing() is not None, reason=str(hf.torchvision_missing()))
needs_timm = pytest.mark.skipif(hf.timm_missing() is not None, reason=str(hf.timm_missing()))
IMAGES = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
RESNET_BLOCKS = [f"layer{stage}.{block}" for stage in range(1, 5) for block in range(2)]


@needs_torchvision
def test_torchvision_resnet18_and_vit():
    import torchvision

    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(weights=None).eval()
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    assert default_layers(resnet) == RESNET_BLOCKS
    assert default_layers(vit) == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    convs = compare(resnet, copy.deepcopy(resnet), [(x, None) for x in IMAGES], reduce="b c h w -> b c")
    np.testing.assert_allclose(np.diag(convs.matrix), 1.0, atol=1e-6)
    against = compare(
        vit,
        resnet,
        IMAGES,
        tokens={"encoder.layers.encoder_layer_0": "first", "encoder.layers.encoder_layer_1": "first"},
    )
    assert against.matrix.shape == (2, 8) and np.isfinite(against.matrix).all()


@needs_timm
def test_timm_vit_and_resnet():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2
    ).eval()
    resnet = timm.create_model("resnet18", pretrained=False).eval()
    assert default_layers(vit) == ["blocks.0", "blocks.1"]
    assert default_layers(resnet) == RESNET_BLOCKS
    result = compare(vit, resnet, IMAGES, tokens={"blocks.0": "mean", "blocks.1": "mean"})
    assert result.matrix.shape == (2, 8) and result.n_examples == 16 and np.isfinite(result.matrix).all()


# --------------------------------------------------------------------------------------------
# The command line: hf:PATH models, text data
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_models(tmp_path_factory):
    """Two tiny models saved with save_pretrained beside a word-level tokenizer, and a text file."""
    root = tmp_path_factory.mktemp("hf")
    hf.save_text_model(str(root / "gpt2"), "gpt2", seed=0)
    hf.save_text_model(str(root / "llama"), "llama", seed=1)
    (root / "lines.txt").write_text("\n".join(hf.LINES) + "\n\n")  # a trailing blank line is skipped
    return root


def run_cli(*args: str) -> int:
    from cka.cli import main

    return main([*map(str, args)])


def test_cli_compares_two_local_models_on_text_token_by_token(text_models, tmp_path, capsys):
    out = tmp_path / "out"
    status = run_cli(
        "compare",
        f"hf:{text_models / 'gpt2'}",
        f"hf:{text_models / 'llama'}",
        "--data",
        text_models / "lines.txt",
        "--tokens",
        "all",
        "--max-length",
        "6",
        "--batch-size",
        "4",
        "--out",
        out,
        "--no-progress",
    )
    assert status == 0, capsys.readouterr().err
    from cka.result import CKAResult

    result = CKAResult.load(out / "cka.json")
    real = sum(min(len(line.split()), 6) for line in hf.LINES)  # word-level: one token per word, truncated to 6
    assert result.n_examples == real and result.settings["n_sequences"] == len(hf.LINES)
    assert result.model1_layers == ("h.0", "h.1") and result.model2_layers == ("layers.0", "layers.1")
    assert result.settings["tokens"] == "all"


def test_cli_text_defaults_to_the_masked_mean_and_reads_hidden_states(text_models, tmp_path, capsys):
    out = tmp_path / "out"
    status = run_cli(
        "compare",
        f"hf:{text_models / 'gpt2'}",
        "--data",
        text_models / "lines.txt",
        "--layers1",
        "hidden_states",
        "--batch-size",
        "6",
        "--out",
        out,
        "--no-progress",
    )
    assert status == 0, capsys.readouterr().err
    from cka.result import CKAResult

    result = CKAResult.load(out / "cka.json")
    assert result.settings["tokens"] == "mean" and result.n_examples == len(hf.LINES)
    assert result.model1_layers == ("hidden_states.0", "hidden_states.1", "hidden_states.2")
    np.testing.assert_allclose(np.diag(result.matrix), 1.0, atol=1e-6)


def test_cli_lists_hidden_states_of_an_hf_model(text_models, capsys):
    assert run_cli("compare", f"hf:{text_models / 'gpt2'}", "--list-layers") == 0
    listed = capsys.readouterr().out.split()
    assert {"h.0", "h.1", "hidden_states.0", "hidden_states.2"} <= set(listed)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["hf:no-such-org/no-such-model", "--data", "lines.txt"],
            "nor in the local Hugging Face cache, and cka never downloads",
        ),
        (["hf:gpt2", "--data", "lines.txt", "--max-length", "0"], "--max-length must be a positive number of tokens"),
        (["hf:gpt2", "--data", "synthetic:3x8x8", "--tokens", "first"], "takes token ids: give it text data"),
        (["models.py:make", "--data", "lines.txt"], "text data"),
    ],
)
def test_cli_errors_are_one_line(text_models, monkeypatch, capsys, args, message):
    monkeypatch.chdir(text_models)
    (text_models / "models.py").write_text(
        "import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Embedding(64, 8), torch.nn.Linear(8, 4))\n"
    )
    assert run_cli("compare", *(a.replace("hf:gpt2", f"hf:{text_models / 'gpt2'}") for a in args), "--no-progress") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cka: error: ") and "\n" not in err and message in err


def test_cli_never_downloads(monkeypatch):
    import os

    from cka.frontends.hf import load_local_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test
    with pytest.raises(ValueError, match="cka never downloads"):
        load_local_model("openai-community/gpt2-this-does-not-exist")
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # and so for anything loaded afterwards
