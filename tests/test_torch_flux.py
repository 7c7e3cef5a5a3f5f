"""f2d_jax.torch on FLUX.1: `Face2DiffusionEncoder.pipeline_embeds` gives diffusers' FluxPipeline the keyword
arguments its own encode_prompt would, with "f l" injected into CLIP and T5, and matches our JAX F2DPipeline; a tiny
FLUX run, packaged, drives FluxPipeline."""
import copy
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import flux_fixtures
from f2d_jax.config import load_config
from f2d_jax.text import PromptError, identifier_prompts
from f2d_jax.text_t5 import t5_identifier_prompts
from f2d_jax.torch import MSID, Face2DiffusionEncoder, Mapping, is_flux_pipeline, text_transformer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = str(ROOT / "configs" / "tiny_flux.py")
FACE = str(ROOT / "f2d_jax" / "assets" / "face.jpg")
PROMPTS = ["a photo of f l", "f l eating bread in front of the eiffel tower"]
NEGATIVE = "a blurry photo"
LENGTH = 32   # the tiny FLUX's T5 prompt length (config.flux.max_sequence_length)


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(the tiny PyTorch FLUX folder, diffusers' FluxPipeline of it, a Face2DiffusionEncoder of the tiny FLUX
    config's sizes with random weights, every tensor non-trivial, read back from msid.safetensors and
    mapping.safetensors in that folder's parent)."""
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("torch_flux")
    flux_fixtures.write_tiny_flux(root / "flux", seed=5)
    model = load_config(CONFIG).model
    msid = MSID(model.msid.image_size, model.msid.patch_size, model.msid.width, model.msid.depth,
                model.msid.num_heads, model.msid.mlp_ratio, model.msid.tap_layers)
    mapping = Mapping(model.mapping.identity_dim, model.mapping.hidden_dim, model.mapping.token_dim,
                      model.mapping.num_layers, exp=model.mapping.expression_dim)
    # Every tensor scaled and shifted at random: BatchNorm statistics, norm scales and null_exp too (running
    # variances stay positive).
    generator = torch.Generator().manual_seed(0)
    for name, module in (("msid", msid), ("mapping", mapping)):
        save_file({key: value * (0.5 + torch.rand(value.shape, generator=generator))
                   + 0.2 * torch.rand(value.shape, generator=generator) - 0.1
                   for key, value in module.state_dict().items() if value.is_floating_point()},
                  root / f"{name}.safetensors")
    f2d = Face2DiffusionEncoder.from_pretrained(msid=root / "msid.safetensors", mapping=root / "mapping.safetensors",
                                                msid_heads=model.msid.num_heads)
    return root, FluxPipeline.from_pretrained(root / "flux"), f2d


@pytest.mark.slow
def test_pipeline_embeds_match_jax(flux, parity):
    """Our F2DPipeline on the same folder and weights (JAX) conditions FLUX as pipeline_embeds does."""
    from f2d_jax.sampling import F2DPipeline

    root, pipe, f2d = flux
    ours = F2DPipeline.from_pretrained(sd=str(root / "flux"), msid=str(root / "msid.safetensors"),
                                       mapping=str(root / "mapping.safetensors"), config=CONFIG, dtype="float32")
    assert ours.models.sd.max_sequence_length == LENGTH
    theirs = f2d.pipeline_embeds(pipe, PROMPTS, f2d.identity(FACE), max_sequence_length=LENGTH)
    expected = ours.encode_prompt(FACE, PROMPTS)
    assert list(theirs) == ["prompt_embeds", "pooled_prompt_embeds"]
    assert theirs["prompt_embeds"].shape == (2, LENGTH, 32) and theirs["pooled_prompt_embeds"].shape == (2, 32)
    parity("torch pipeline_embeds vs JAX encode_prompt (tiny FLUX), prompt_embeds",
           _max_err(theirs["prompt_embeds"], expected["context"]), 1e-4)
    parity("torch pipeline_embeds vs JAX encode_prompt (tiny FLUX), pooled_prompt_embeds",
           _max_err(theirs["pooled_prompt_embeds"], expected["pooled"]), 1e-4)


def test_identity_reaches_clip_and_t5(flux, monkeypatch):
    """The identity changes both outputs; the first 32 of the tokens' width reach CLIP's pooled vector only, the
    rest T5's states."""
    _, pipe, f2d = flux
    identity = f2d.identity(FACE)
    plain, other = (f2d.pipeline_embeds(pipe, PROMPTS, x, max_sequence_length=LENGTH) for x in (identity, -identity))
    assert all(_max_err(plain[name], other[name]) > 1e-3 for name in plain)
    tokens = f2d.identity_tokens(identity)
    embeds = {}
    for sign in (1, -1):
        changed = torch.cat([tokens[..., :32], sign * tokens[..., 32:]], -1)
        monkeypatch.setattr(f2d, "identity_tokens", lambda identity, expression=None: changed)
        embeds[sign] = f2d.pipeline_embeds(pipe, PROMPTS, None, max_sequence_length=LENGTH)
    torch.testing.assert_close(embeds[1]["pooled_prompt_embeds"], embeds[-1]["pooled_prompt_embeds"], atol=0, rtol=0)
    assert _max_err(embeds[1]["prompt_embeds"], embeds[-1]["prompt_embeds"]) > 1e-3
    for name in plain:
        torch.testing.assert_close(embeds[1][name], plain[name], atol=0, rtol=0)


def _encoders_own_tokens(pipe, prompts, length) -> torch.Tensor:
    """(B, 2, 32 + 32): what CLIP (token + position embeddings at "f l") and T5 (input embeddings at the tokens
    carrying "f" and "l") compute at the identifier anyway; written there, they leave the prompt's encoding as is."""
    clip_ids, clip_positions = identifier_prompts(prompts, pipe.tokenizer)
    t5_ids, t5_positions = t5_identifier_prompts(prompts, pipe.tokenizer_2, length)
    rows = torch.arange(len(prompts))[:, None]
    with torch.no_grad():
        clip = text_transformer(pipe.text_encoder).embeddings(torch.as_tensor(clip_ids, dtype=torch.long))
        t5 = pipe.text_encoder_2.get_input_embeddings()(torch.as_tensor(t5_ids, dtype=torch.long))
    clip = clip[rows, torch.as_tensor(clip_positions)[:, None] + torch.arange(2)]
    return torch.cat([clip, t5[rows, torch.as_tensor(t5_positions, dtype=torch.long)]], -1)


@pytest.mark.parametrize("length", [LENGTH, 512])
def test_plain_text_is_the_pipelines_encode_prompt(flux, monkeypatch, length):
    """The tokens the encoders compute anyway, injected, reproduce FluxPipeline's own encode_prompt exactly (ids,
    padding to max_sequence_length, CLIP's pooled output, T5's last state), and a negative prompt's too."""
    _, pipe, f2d = flux
    tokens = _encoders_own_tokens(pipe, PROMPTS, length)
    monkeypatch.setattr(f2d, "identity_tokens", lambda identity, expression=None: tokens)
    ours = f2d.pipeline_embeds(pipe, PROMPTS, None, negative_prompt=NEGATIVE, max_sequence_length=length)
    assert list(ours) == ["prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds",
                          "negative_pooled_prompt_embeds"]
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=length)
        negative, negative_pooled, _ = pipe.encode_prompt([NEGATIVE] * 2, None, device="cpu",
                                                          max_sequence_length=length)
    assert embeds.shape == (2, length, 32)
    for name, value in zip(ours, (embeds, pooled, negative, negative_pooled)):
        torch.testing.assert_close(ours[name], value, atol=0, rtol=0, msg=f"{name} ({length} T5 tokens)")


def test_negative_prompt_is_only_the_unconditional_branch(flux):
    """One negative prompt per prompt is encoded as it is; the identity goes only into the positive branch."""
    _, pipe, f2d = flux
    identity = f2d.identity(FACE)
    plain = f2d.pipeline_embeds(pipe, PROMPTS, identity, max_sequence_length=LENGTH)
    both = f2d.pipeline_embeds(pipe, PROMPTS, identity, negative_prompt=[NEGATIVE, "a photo of f l"],
                               max_sequence_length=LENGTH)
    with torch.no_grad():
        negative, negative_pooled, _ = pipe.encode_prompt([NEGATIVE, "a photo of f l"], None, device="cpu",
                                                          max_sequence_length=LENGTH)
    for name in plain:
        torch.testing.assert_close(both[name], plain[name], atol=0, rtol=0)
    torch.testing.assert_close(both["negative_prompt_embeds"], negative, atol=0, rtol=0)
    torch.testing.assert_close(both["negative_pooled_prompt_embeds"], negative_pooled, atol=0, rtol=0)


def test_embeds_take_each_text_encoders_dtype(flux):
    """As FluxPipeline: prompt_embeds in T5's dtype, pooled_prompt_embeds in CLIP's (the tokens cast to each)."""
    _, pipe, f2d = flux
    mixed = copy.copy(pipe)
    mixed.text_encoder_2 = copy.deepcopy(pipe.text_encoder_2).to(torch.bfloat16)
    identity = f2d.identity(FACE)
    full = f2d.pipeline_embeds(pipe, PROMPTS, identity, max_sequence_length=LENGTH)
    half = f2d.pipeline_embeds(mixed, PROMPTS, identity, negative_prompt=NEGATIVE, max_sequence_length=LENGTH)
    assert {name: value.dtype for name, value in half.items()} == {
        "prompt_embeds": torch.bfloat16, "pooled_prompt_embeds": torch.float32,
        "negative_prompt_embeds": torch.bfloat16, "negative_pooled_prompt_embeds": torch.float32}
    torch.testing.assert_close(half["pooled_prompt_embeds"], full["pooled_prompt_embeds"], atol=0, rtol=0)
    torch.testing.assert_close(half["prompt_embeds"].float(), full["prompt_embeds"], atol=0.1, rtol=0.05)


def test_a_flux_pipeline_is_told_by_its_t5_and_transformer(flux):
    pipe = flux[1]
    assert is_flux_pipeline(pipe)
    assert not is_flux_pipeline(types.SimpleNamespace(text_encoder_2=pipe.text_encoder, transformer=pipe.transformer))
    assert not is_flux_pipeline(types.SimpleNamespace(text_encoder_2=pipe.text_encoder_2))


def test_flux_errors(flux):
    _, pipe, f2d = flux
    identity = torch.zeros(1, f2d.msid.features)
    narrow = Face2DiffusionEncoder(f2d.msid, Mapping(identity=f2d.msid.features, hidden=16, out=32)).eval()
    with pytest.raises(ValueError, match="writes 32-dim tokens but the text encoders are 32 [+] 32 = 64 wide "
                                         "together: weights for another base model"):
        narrow.pipeline_embeds(pipe, PROMPTS, identity)
    with pytest.raises(ValueError, match="3 identities for 2 prompts; give one or one per prompt"):
        f2d.pipeline_embeds(pipe, PROMPTS, torch.zeros(3, f2d.msid.features))
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts; give one or one per prompt"):
        f2d.pipeline_embeds(pipe, PROMPTS, identity, negative_prompt=["a"] * 3)
    with pytest.raises(PromptError, match="the prompt has no identifier 'f l'.*'a photo of a person'"):
        f2d.pipeline_embeds(pipe, ["a photo of f l", "a photo of a person"], identity)


@pytest.mark.slow
def test_tiny_flux_run_packaged_drives_flux_pipeline(flux, tmp_path):
    """train.py's tiny FLUX for 2 steps -> `f2d-convert package` -> Face2DiffusionEncoder.from_pretrained(model=)
    -> FluxPipeline (the tiny folder: the run's base, the tiny random FLUX, has none; the widths are the same)
    makes a finite image; `f2d-convert export` of the run writes a mapping.pt that loads strictly to the same
    tokens."""
    from f2d_jax.convert.__main__ import main as convert_main
    from f2d_jax.train.launch import run

    pipe = flux[1]
    assert run(load_config(CONFIG, ["train.steps=2", "log.sample_every=0"]), tmp_path / "run") == 0
    assert convert_main(["package", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    f2d = Face2DiffusionEncoder.from_pretrained(model=tmp_path / "model")
    identity = f2d.identity(FACE)
    embeds = f2d.pipeline_embeds(pipe, "a photo of f l", identity)   # T5's length: the run's (32)
    assert embeds["prompt_embeds"].shape == (1, 32, 32) and embeds["pooled_prompt_embeds"].shape == (1, 32)
    assert f2d.pipeline_embeds(pipe, "a photo of f l", identity, max_sequence_length=512)["prompt_embeds"].shape \
        == (1, 512, 32)
    image = pipe(**embeds, num_inference_steps=2, height=64, width=64, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    assert convert_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    exported = Face2DiffusionEncoder.from_pretrained(msid=tmp_path / "model" / "msid.safetensors",
                                                     mapping=tmp_path / "export" / "mapping.pt", msid_heads=2)
    assert exported.mapping.i2t_first.fc_out.weight.shape == (64, 64)
    with torch.no_grad():
        torch.testing.assert_close(exported.identity_tokens(identity), f2d.identity_tokens(identity), atol=0, rtol=0)
