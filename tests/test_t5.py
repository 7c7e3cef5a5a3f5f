"""FLUX.1's text side against transformers: our T5 encoder (plain and with "f l" injected), its loading and export,
the T5 prompts and their identifier positions, and CLIP ViT-L's pooled output as FLUX configures it."""
import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flux_fixtures import tiny_t5, tiny_t5_tokenizer
from sd_fixtures import fake_hub, randomize
from test_clip_text import _injected
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast
from transformers.models.t5.modeling_t5 import T5Attention

from f2d_jax import InputWarning
from f2d_jax.convert.layout import CheckpointMismatchError, from_torch
from f2d_jax.models import CLIPTextEncoder
from f2d_jax.models import stable_diffusion as sdm
from f2d_jax.models.clip_text import CLIP_LAYOUT
from f2d_jax.models.sd_config import UnsupportedConfigError
from f2d_jax.models.t5 import (T5_LAYOUT, T5_XXL, TINY_T5, T5Encoder, load_t5, relative_position_buckets, t5_fields,
                               t5_state_dict)
from f2d_jax.text import PromptError, identifier_prompts
from f2d_jax.text_t5 import load_t5_tokenizer, t5_identifier_prompts

LENGTH = 40   # tokens: relative distances past TINY_T5's maximum distance (12)
PROMPTS = ["a photo of f l", "F L, a photo of a person in paris", "(f l) eating bread in front of the eiffel tower"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A FLUX-like folder: text_encoder_2/ (a tiny T5 v1.1 in one safetensors file) and tokenizer_2/."""
    root = tmp_path_factory.mktemp("flux")
    tiny_t5(root / "text_encoder_2", seed=0)
    tiny_t5_tokenizer(root / "tokenizer_2")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    return root


@pytest.fixture(scope="module")
def t5(folder):
    """(the PyTorch T5EncoderModel, our module, our variables loaded from its folder)."""
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval()
    module, variables = load_t5(folder / "text_encoder_2")
    return model, module, variables


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_t5_tokenizer(folder)


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _torch_injected(model, ids, tokens, positions):
    """transformers' last hidden state with tokens[b, k] written over the input embedding at positions[b, k]."""
    embeds = model.shared(torch.as_tensor(ids).long()).detach().clone()
    embeds[torch.arange(len(ids))[:, None], torch.as_tensor(positions).long()] = tokens
    return model(inputs_embeds=embeds).last_hidden_state


# --------------------------------------------------------------------------- the encoder

@pytest.mark.parametrize("sizes", [(8, 12, 40), (32, 128, 600)], ids=["tiny", "T5-XXL"])
def test_relative_position_buckets_match_transformers(sizes):
    buckets, distance, length = sizes
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    theirs = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=buckets,
                                                   max_distance=distance)
    ours = relative_position_buckets(length, buckets, distance)
    np.testing.assert_array_equal(ours, theirs.numpy())
    assert set(np.unique(ours)) == set(range(buckets)) - {buckets // 2}   # every bucket but "after, distance 0"


def test_t5_matches_transformers(t5, parity):
    model, module, variables = t5
    ids = np.random.default_rng(0).integers(0, module.vocab_size, (2, LENGTH)).astype(np.int32)
    ours = jax.jit(module.apply)(variables, ids)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids).long()).last_hidden_state
    assert ours.shape == (2, LENGTH, module.width) and ours.dtype == jnp.float32
    parity("T5 v1.1 tiny last_hidden_state", _max_err(ours, theirs), 1e-4)


def test_remat_and_bfloat16(t5):
    _, module, variables = t5
    ids = np.random.default_rng(0).integers(0, module.vocab_size, (2, LENGTH)).astype(np.int32)
    ours = module.apply(variables, ids)
    remat = module.clone(remat=True).apply(variables, ids)
    np.testing.assert_allclose(remat, ours, atol=1e-6)
    half = T5Encoder(**t5_fields(TINY_T5), dtype=jnp.bfloat16)
    low = half.apply(jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables), ids)
    assert low.dtype == jnp.bfloat16 and _max_err(low, ours) < 0.1 * float(np.abs(ours).max())


def test_injected_tokens_match_transformers(t5, tokenizer, parity):
    """The tokens replace the input embeddings at the positions T5's tokenizer gives "f" and "l", adjacent or not."""
    model, module, variables = t5
    ids, positions = t5_identifier_prompts(PROMPTS, tokenizer, max_length=LENGTH)
    assert (positions[:, 1] - positions[:, 0] == [1, 2, 1]).all()   # "▁", "F", "▁", "L": not adjacent
    tokens = np.random.default_rng(1).normal(size=(len(ids), 2, module.width)).astype(np.float32)
    ours = jax.jit(module.apply)(variables, ids, tokens, positions)
    with torch.no_grad():
        theirs = _torch_injected(model, ids, torch.from_numpy(tokens), positions)
    parity("T5 v1.1 tiny last_hidden_state (injected f l)", _max_err(ours, theirs), 1e-4)
    assert _max_err(ours, module.apply(variables, ids)) > 1e-2


def test_gradient_to_injected_tokens_matches_torch(t5, tokenizer, parity):
    model, module, variables = t5
    ids, positions = t5_identifier_prompts(PROMPTS, tokenizer, max_length=LENGTH)
    tokens = np.random.default_rng(1).normal(size=(len(ids), 2, module.width)).astype(np.float32)
    weights = np.random.default_rng(2).normal(size=(*ids.shape, module.width)).astype(np.float32)
    grad = jax.grad(lambda t: (module.apply(variables, ids, t, positions) * weights).sum())(tokens)
    torch_tokens = torch.from_numpy(tokens).requires_grad_(True)
    (_torch_injected(model, ids, torch_tokens, positions) * torch.from_numpy(weights)).sum().backward()
    assert np.abs(grad).min() > 0
    parity("T5 v1.1 tiny gradient w.r.t. the injected tokens", _max_err(grad, torch_tokens.grad), 1e-4)


def test_t5_v1_0_relu_matches_transformers(tmp_path, parity):
    model = tiny_t5(tmp_path / "relu", seed=3, feed_forward_proj="relu")
    module, variables = load_t5(tmp_path / "relu")
    assert set(variables["params"]["blocks"]["layer_1"]["DenseReluDense"]) == {"wi", "wo"}
    ids = np.random.default_rng(3).integers(0, module.vocab_size, (2, LENGTH)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids).long()).last_hidden_state
    parity("T5 v1.0 (relu) tiny last_hidden_state", _max_err(module.apply(variables, ids), theirs), 1e-4)


def test_xxl_config_builds_flux_t5():
    module = T5Encoder(**t5_fields(T5_XXL))
    assert (module.width, module.num_layers, module.num_heads, module.d_ff, module.vocab_size) == (
        4096, 24, 64, 10240, 32128)
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
    assert shapes["blocks"]["layer_1"]["DenseReluDense"]["wi_0"]["kernel"].shape == (24, 4096, 10240)
    assert shapes["relative_attention_bias"]["embedding"].shape == (32, 64)


# --------------------------------------------------------------------------- weights: folders, shards, hub, export

def test_loads_flux_folder_shards_and_hub(t5, folder, tmp_path, monkeypatch):
    model, module, variables = t5
    same = lambda loaded: jax.tree.map(np.testing.assert_array_equal, loaded, variables)  # noqa: E731
    flux_module, flux_variables = load_t5(folder)   # a FLUX pipeline folder: its text_encoder_2/
    assert flux_module == module
    same(flux_variables)

    model.save_pretrained(tmp_path / "repo" / "text_encoder_2", max_shard_size="20KB")
    shards = sorted(p.name for p in (tmp_path / "repo" / "text_encoder_2").iterdir())
    assert "model.safetensors.index.json" in shards and len(shards) > 3, shards
    same(load_t5(tmp_path / "repo" / "text_encoder_2")[1])

    for extra in ("flux1-dev.safetensors", "transformer/diffusion_pytorch_model.safetensors"):  # never downloaded
        (tmp_path / "repo" / extra).parent.mkdir(exist_ok=True)
        (tmp_path / "repo" / extra).write_bytes(b"not for T5")
    shutil.copytree(folder / "tokenizer_2", tmp_path / "repo" / "tokenizer_2")
    calls = fake_hub(monkeypatch, {"someone/flux": tmp_path / "repo"}, tmp_path / "hub")
    same(load_t5("someone/flux", revision="main")[1])
    got = sorted(p.relative_to(tmp_path / "hub" / "someone/flux").as_posix()
                 for p in (tmp_path / "hub" / "someone/flux").rglob("*") if p.is_file())
    assert got == sorted(f"text_encoder_2/{name}" for name in shards) and calls[0][:2] == ("someone/flux", "main")
    hub_tokenizer = load_t5_tokenizer("someone/flux")
    assert hub_tokenizer("a photo of f l").input_ids == load_t5_tokenizer(folder)("a photo of f l").input_ids


def test_state_dict_round_trip(t5):
    model, module, variables = t5
    state = t5_state_dict(variables)
    assert "encoder.block.1.layer.1.DenseReluDense.wi_0.weight" in state
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    jax.tree.map(np.testing.assert_array_equal, from_torch(state, target, T5_LAYOUT), variables)


def test_load_errors(t5, folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no T5EncoderModel folder or FLUX pipeline folder at"):
        load_t5(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no T5 encoder config at .*empty/config.json or .*empty/"
                                                r"text_encoder_2/config.json: expected a transformers T5EncoderModel"):
        load_t5(tmp_path / "empty")
    config = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no T5 encoder weights in .*: expected one of model.safetensors, "):
        load_t5(tmp_path)
    shutil.copy(folder / "text_encoder_2" / "model.safetensors", tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "d_ff": 38}))
    with pytest.raises(CheckpointMismatchError, match=r"6 shape mismatches: .*DenseReluDense\.wi_0\.weight "
                                                      r"\(37, 32\) \(model wants \(38, 32\)\)"):
        load_t5(tmp_path)
    for change, message in (({"feed_forward_proj": "gated-silu"}, "feed_forward_proj='gated-silu': the Flax T5 "
                                                                  r"encoder computes \['gated-gelu', 'relu'\] only"),
                            ({"model_type": "umt5"}, "model_type 'umt5'; expected a transformers T5 config")):
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedConfigError, match=message):
            load_t5(tmp_path)

    model, module, variables = t5
    state = t5_state_dict(variables)
    del state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    target = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: encoder\.block\.0\.layer\.0\.SelfAttention"
                                                      r"\.relative_attention_bias\.weight$"):
        from_torch(state, target, T5_LAYOUT)
    with pytest.raises(ValueError, match="injected tokens need their positions"):
        module.apply(variables, np.zeros((1, 4), np.int32), np.zeros((1, 2, 32), np.float32))


# --------------------------------------------------------------------------- prompts

@pytest.fixture(scope="module", params=["T5TokenizerFast", "tokenizer.json"])
def tokenizers(request, folder, tokenizer):
    """The tokenizer as transformers' T5TokenizerFast loads it (its own white-space split and Metaspace), and the
    saved tokenizer.json run as written (Metaspace alone, spaces collapsed by its normalizer)."""
    if request.param == "T5TokenizerFast":
        return tokenizer
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer_2" / "tokenizer.json"), pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


def test_ids_as_flux_pipeline_makes_them(tokenizer):
    long = "a photo of f l in paris, " + "a portrait " * 20
    with pytest.warns(InputWarning, match="prompt is 48 tokens long; T5 reads only the first 15"):
        ids, _ = t5_identifier_prompts([*PROMPTS, long], tokenizer, max_length=16)
    expected = tokenizer([*PROMPTS, long], padding="max_length", max_length=16, truncation=True).input_ids
    assert ids.dtype == np.int32 and ids.shape == (4, 16)
    np.testing.assert_array_equal(ids, expected)
    assert tokenizer.convert_ids_to_tokens(ids[0][:7]) == ["▁a", "▁photo", "▁of", "▁f", "▁l", "</s>", "<pad>"]
    assert list(ids[0][5:]) == [1] + [0] * 10 and ids[3][-1] == 1 and 0 not in ids[3]


@pytest.mark.parametrize("prompt, expected", [
    ("f l eating bread", (0, 1)),                       # at the start
    ("a photo of f l", (3, 4)),                         # at the end
    ("a portrait of f l, smiling", (3, 4)),             # before punctuation
    ("(f l) in paris", (2, 3)),                         # after punctuation: "▁", "(", "f", "▁l", ")"
    ("F L, a photo", (1, 3)),                           # capitals: "▁", "F", "▁", "L"
    ("a photo of  f   l", (3, 4)),                      # runs of spaces
    ("f x f l", (3, 4)),                                # "f" followed by a word not "l"
    ("photo of fl and f l", (4, 5)),                    # "fl" is not the identifier
    ("f.l and f l", (4, 5)),                            # nor "f.l"
])
def test_identifier_positions(tokenizers, prompt, expected):
    ids, positions = t5_identifier_prompts(prompt, tokenizers, max_length=16)
    assert tuple(positions[0]) == expected
    letters = [t.lstrip("▁").lower() for t in tokenizers.convert_ids_to_tokens(ids[0][positions[0]].tolist())]
    assert letters == ["f", "l"]


def test_second_identifier_warns(tokenizer):
    with pytest.warns(InputWarning, match="the prompt has the identifier 'f l' twice; only the first stands for the "
                                          "person, the second is read as the words f and l: 'f l and f l'"):
        _, positions = t5_identifier_prompts("f l and f l", tokenizer, max_length=16)
    assert tuple(positions[0]) == (0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t5_identifier_prompts(["a photo of f l", "f l and fl"], tokenizer, max_length=16)


@pytest.mark.parametrize("prompt", ["a photo of a person", "a photo of fl", "a photo of f.l", "a photo of f"])
def test_prompt_without_identifier(tokenizer, prompt):
    with pytest.raises(PromptError, match=f"the prompt has no identifier 'f l' \\(the words f and l, as in 'a photo "
                                          f"of f l'\\): '{prompt}'"):
        t5_identifier_prompts(["a photo of f l", prompt], tokenizer, max_length=16)


def test_truncation(tokenizer):
    """16 ids: 15 of the prompt's tokens and </s>. "l" as the 15th token is read, as the 16th it is cut off."""
    kept = "a " * 13 + "f l"
    ids, positions = t5_identifier_prompts(kept, tokenizer, max_length=16)
    assert tuple(positions[0]) == (13, 14) and ids[0][-1] == 1
    cut = "a " * 14 + "f l"
    with pytest.raises(PromptError, match=r"the identifier 'f l' is cut off: the prompt is 16 tokens long and T5 "
                                          r"reads only the first 15; move 'f l' earlier or shorten the prompt: 'a a "):
        t5_identifier_prompts(cut, tokenizer, max_length=16)
    assert isinstance(PromptError("x"), ValueError)
    with pytest.warns(InputWarning, match="prompt is 16 tokens long; T5 reads only the first 15: 'f l a a"):
        t5_identifier_prompts("f l " + "a " * 14, tokenizer, max_length=16)


def test_tokenizer_folders(folder, tmp_path):
    with pytest.raises(NotADirectoryError, match="is a file; expected a tokenizer folder"):
        load_t5_tokenizer(folder / "model_index.json")
    direct = load_t5_tokenizer(folder / "tokenizer_2")
    assert (direct.pad_token_id, direct.eos_token_id, direct.unk_token_id) == (0, 1, 2)


# --------------------------------------------------------------------------- FLUX's CLIP

@pytest.mark.parametrize("inject", [False, True], ids=["plain", "injected"])
def test_flux_clip_pooled_output_matches_transformers(inject, parity):
    """FLUX.1's text_encoder: CLIPTextModel (quick_gelu, no projection) whose config has eos_token_id 2, so
    transformers pools at argmax(ids), the first end-of-text token of ids padded with it, as ours does."""
    config = CLIPTextConfig(**sdm.TINY_CONFIGS["text_encoder"], bos_token_id=0, eos_token_id=2, pad_token_id=1)
    torch.manual_seed(4)
    model = randomize(CLIPTextModel(config), 4)
    ours = CLIPTextEncoder(**sdm.clip_text_fields(sdm.TINY_CONFIGS["text_encoder"]))
    target = jax.eval_shape(ours.init, jax.random.key(0), np.zeros((1, ours.max_length), np.int32))
    variables = from_torch({k: v.numpy() for k, v in model.state_dict().items()}, target, CLIP_LAYOUT)
    ids, positions = identifier_prompts(PROMPTS)
    tokens = np.random.default_rng(5).normal(size=(len(ids), 2, ours.width)).astype(np.float32) if inject else None
    _, pooled = jax.jit(ours.apply)(variables, ids, tokens, positions if inject else None)
    with torch.no_grad(), _injected(model, positions, torch.from_numpy(tokens) if inject else None):
        out = model(torch.from_numpy(ids).long())
    end = ids.argmax(-1)
    assert (ids[np.arange(len(ids)), end] == 49407).all()
    np.testing.assert_array_equal(out.pooler_output, out.last_hidden_state[np.arange(len(ids)), end])
    if inject:  # the injection reaches the pooled output through the causal mask
        assert _max_err(pooled, ours.apply(variables, ids)[1]) > 1e-2
    parity(f"FLUX CLIP-L tiny pooled output ({'injected f l' if inject else 'no injection'})",
           _max_err(pooled, out.pooler_output), 1e-4)
