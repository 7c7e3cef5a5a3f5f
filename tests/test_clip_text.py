"""SD 2.x's and SDXL's CLIP text encoders (GELU, text projection, penultimate state, "!" padding) vs transformers."""
import contextlib
import copy
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from sd_fixtures import randomize
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from f2d_jax.convert.checkpoints import torch_state_dict
from f2d_jax.convert.layout import CheckpointMismatchError, from_torch
from f2d_jax.models import CLIPTextEncoder
from f2d_jax.models import stable_diffusion as sdm
from f2d_jax.models.clip_text import CLIP_LAYOUT
from f2d_jax.text import identifier_prompts, load_tokenizer
from f2d_jax.torch import text_transformer

PROMPTS = ["a photo of f l", "f l eating bread in front of the Eiffel Tower", "portrait of f l, smiling"]
DATA = Path(__file__).resolve().parent / "data" / "hf_flax_clip"
EOS, BANG = 49407, 0   # SD v1's pad (<|endoftext|>), SD 2's and SDXL tokenizer_2's pad ("!")

# name: (bundle configs, component, transformers class, pad id of the tokenizer it is used with, our extra fields)
CASES = {
    "SD 2 CLIP": (sdm.TINY_SD2_CONFIGS, "text_encoder", CLIPTextModel, BANG, dict(pad_token_id=BANG)),
    "SDXL CLIP-L": (sdm.TINY_SDXL_CONFIGS, "text_encoder", CLIPTextModel, EOS, dict(penultimate=True)),
    "SDXL bigG": (sdm.TINY_SDXL_CONFIGS, "text_encoder_2", CLIPTextModelWithProjection, BANG,
                  dict(penultimate=True, pad_token_id=BANG)),
}


def _torch_model(configs, component, cls, pad, seed=0):
    torch.manual_seed(seed)
    config = CLIPTextConfig(**configs[component], bos_token_id=49406, eos_token_id=EOS, pad_token_id=pad)
    return randomize(cls(config), seed)


def _state(model) -> dict:
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _target(ours) -> dict:
    return jax.eval_shape(ours.init, jax.random.key(0), np.zeros((1, ours.max_length), np.int32))


@pytest.fixture(scope="module")
def encoders():
    """name -> (PyTorch model, our encoder, our variables converted from the PyTorch state dict)."""
    out = {}
    for i, (name, (configs, component, cls, pad, extra)) in enumerate(CASES.items()):
        model = _torch_model(configs, component, cls, pad, seed=i)
        ours = CLIPTextEncoder(**sdm.clip_text_fields(configs[component]), **extra)
        out[name] = model, ours, from_torch(_state(model), _target(ours), CLIP_LAYOUT, name)
    return out


@pytest.fixture(scope="module")
def prompts():
    """(eos-padded ids as SD v1's tokenizer makes them, "!"-padded ids from the same vocabulary, positions of f)."""
    ids, positions = identifier_prompts(PROMPTS)
    bang = copy.deepcopy(load_tokenizer())   # the loaded one is cached and shared
    bang.pad_token = "!"
    assert bang.pad_token_id == BANG
    bang_ids, bang_positions = identifier_prompts(PROMPTS, bang)
    np.testing.assert_array_equal(bang_positions, positions)
    assert (bang_ids != ids).any()
    return ids, bang_ids, positions


@contextlib.contextmanager
def _injected(model, positions, tokens):
    """transformers' embeddings (token + position) overwritten at positions[b] + k by tokens[b, k], as the
    official F2D code does (no position embedding added to the injected vectors)."""
    def hook(module, args, hidden):
        hidden = hidden.clone()
        rows = torch.arange(len(hidden))[:, None]
        hidden[rows, torch.as_tensor(positions).long()[:, None] + torch.arange(tokens.shape[1])] = tokens
        return hidden

    handle = text_transformer(model).embeddings.register_forward_hook(hook) if tokens is not None else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _max_err(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("inject", [False, True], ids=["plain", "injected"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.slow
def test_text_encoder_matches_transformers(encoders, prompts, name, inject, parity):
    """Ours on eos-padded ids (as F2D tokenizes) == transformers on the ids of the encoder's own tokenizer."""
    model, ours, variables = encoders[name]
    ids, bang_ids, positions = prompts
    pad = CASES[name][3]
    tokens = np.random.default_rng(1).normal(size=(len(ids), 2, ours.width)).astype(np.float32) if inject else None
    hidden, pooled = jax.jit(ours.apply)(variables, ids, tokens, positions if inject else None)
    torch_tokens = torch.from_numpy(tokens) if inject else None
    with torch.no_grad(), _injected(model, positions, torch_tokens):
        out = model(torch.from_numpy(bang_ids if pad == BANG else ids).long(), output_hidden_states=True)
    what = "with injected f l" if inject else "no injection"
    if ours.penultimate:
        assert len(out.hidden_states) == ours.num_layers + 1
        parity(f"{name} penultimate hidden state ({what})", _max_err(hidden, out.hidden_states[-2]), 1e-4)
        assert _max_err(hidden, out.last_hidden_state) > 1e-2  # not the last state
    else:
        parity(f"{name} last_hidden_state ({what})", _max_err(hidden, out.last_hidden_state), 1e-4)
    if ours.projection_dim is not None:
        assert pooled.shape == (len(ids), ours.projection_dim)
        parity(f"{name} text_embeds, projected pooled ({what})", _max_err(pooled, out.text_embeds), 1e-4)
    else:
        parity(f"{name} pooled output ({what})", _max_err(pooled, out.pooler_output), 1e-4)
    if pad == BANG:  # the re-padding matters: without it the states after the end-of-text token differ
        plain, _ = ours.clone(pad_token_id=None).apply(variables, ids, tokens, positions if inject else None)
        assert _max_err(plain, hidden) > 1e-2
    if inject:  # the injection reaches the pooled embedding through the causal mask
        _, plain_pooled = ours.apply(variables, ids)
        assert _max_err(plain_pooled, pooled) > 1e-2


def test_new_fields_keep_the_parameter_tree(encoders):
    _, ours, variables = encoders["SDXL bigG"]
    plain = _target(ours.clone(penultimate=False, pad_token_id=None, projection_dim=None))
    tree = jax.tree.map(lambda x: x.shape, _target(ours))
    assert tree["params"].pop("text_projection") == {"kernel": (48, 48)}
    assert tree == jax.tree.map(lambda x: x.shape, plain)
    ids, _ = identifier_prompts(PROMPTS)
    remat = ours.clone(remat=True).apply(variables, ids)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), remat, ours.apply(variables, ids))


def test_clip_text_fields_projection():
    assert sdm.clip_text_fields(sdm.TINY_SDXL_CONFIGS["text_encoder_2"])["projection_dim"] == 48
    assert sdm.clip_text_fields(sdm.TINY_SDXL_CONFIGS["text_encoder"])["projection_dim"] is None
    no_arch = {k: v for k, v in sdm.TINY_SDXL_CONFIGS["text_encoder_2"].items() if k != "architectures"}
    assert sdm.clip_text_fields(no_arch)["projection_dim"] is None  # a plain CLIPTextModel ignores projection_dim
    with pytest.raises(sdm.UnsupportedConfigError, match="hidden_act='relu'"):
        sdm.clip_text_fields(dict(no_arch, hidden_act="relu"))


def test_projection_weights_load_from_safetensors(encoders, tmp_path):
    model, ours, variables = encoders["SDXL bigG"]
    model.save_pretrained(tmp_path / "pt")  # model.safetensors: text_model.* and top-level text_projection.weight
    assert (tmp_path / "pt" / "model.safetensors").is_file()
    config = json.loads((tmp_path / "pt" / "config.json").read_text())
    built = CLIPTextEncoder(**sdm.clip_text_fields(config), penultimate=True, pad_token_id=BANG)
    assert built == ours
    loaded = sdm.load_component("text_encoder", tmp_path / "pt", _target(built))
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    exported = torch_state_dict("text_encoder", variables, ours)  # and back: a strict load_state_dict succeeds
    model.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)



@pytest.mark.parametrize("name", ["plain", "projection"])
def test_hugging_face_flax_weights_load_as_their_pytorch_weights(name, tmp_path):
    """transformers' own PyTorch -> Flax conversion (Hugging Face's Flax layout: text_model/encoder/layers/<i>/...,
    text_projection), shipped in tests/data/hf_flax_clip, loads into the same variables as the PyTorch weights."""
    folder = DATA / name
    encoder = CLIPTextEncoder(**sdm.clip_text_fields(json.loads((folder / "config.json").read_text())))
    from_flax = sdm.load_component("text_encoder", folder, _target(encoder))   # the msgpack comes first
    (tmp_path / "pt").mkdir()
    for file in ("config.json", "model.safetensors"):
        (tmp_path / "pt" / file).write_bytes((folder / file).read_bytes())
    from_torch = sdm.load_component("text_encoder", tmp_path / "pt", _target(encoder))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), from_flax, from_torch)


def test_missing_text_projection_is_a_mismatch(tmp_path):
    configs = sdm.TINY_SDXL_CONFIGS
    config = {k: v for k, v in configs["text_encoder_2"].items() if k != "architectures"}
    _torch_model({"te": config}, "te", CLIPTextModel, BANG).save_pretrained(tmp_path / "pt")
    target = _target(CLIPTextEncoder(**sdm.clip_text_fields(configs["text_encoder_2"])))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: text_projection\.weight$"):
        sdm.load_component("text_encoder", tmp_path / "pt", target)
    plain = json.loads((DATA / "plain" / "config.json").read_text())
    target = _target(CLIPTextEncoder(**sdm.clip_text_fields({**plain, "projection_dim": 32,
                                                             "architectures": ["CLIPTextModelWithProjection"]})))
    with pytest.raises(CheckpointMismatchError, match=r"1 missing keys: params/text_projection/kernel$"):
        sdm.load_component("text_encoder", DATA / "plain", target)


