"""f2d_jax.torch: JAX-side weights (tiny, random) exported in the official layout drive the PyTorch
encoders and a diffusers StableDiffusionPipeline; prompt embeddings match the JAX path."""
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from PIL import Image

import sd_fixtures
from f2d_jax.config import load_config
from f2d_jax.convert import save_mapping, save_msid
from f2d_jax.encoders import Encoders
from f2d_jax.faces import align_face, msid_input
from f2d_jax.models.stable_diffusion import load_stable_diffusion
from f2d_jax.text import PromptError, identifier_prompts
from f2d_jax.torch import MSID, Face2DiffusionEncoder, WeightsMismatchError, read_weights, text_embeds

ROOT = Path(__file__).resolve().parent.parent
FACE = str(resources.files("f2d_jax").joinpath("assets/face.jpg"))
OTHER_FACE = Path(__file__).parent / "data" / "faces" / "obama.jpg"
PROMPTS = ["a photo of f l", "an oil painting of f l wearing a red hat, highly detailed", "f l at the beach"]


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def jax_side(tmp_path_factory):
    """(encoders, variables, weights directory): tiny random MSID + mapping saved as msid.pt / mapping.safetensors,
    the tiny SD's text encoder loaded on the JAX side from the diffusers directory."""
    directory = tmp_path_factory.mktemp("f2d")
    sd_fixtures.write_tiny_sd(directory / "sd", seed=0)
    sd, sd_params = load_stable_diffusion(directory / "sd")
    config = load_config(ROOT / "configs" / "tiny.py")
    encoders = Encoders.from_config(config.model, sd.text_encoders)
    variables = encoders.init(jax.random.key(0), ("msid", "mapping"))
    # Every leaf non-trivial (BatchNorm statistics, norm scales, null_exp), running variances stay positive.
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda x: x * rng.uniform(0.5, 1.5, x.shape) + rng.uniform(-0.1, 0.1, x.shape),
                             variables)
    variables["text_encoder"] = sd_params["text_encoder"]
    save_msid(variables["msid"], directory / "msid.pt")
    save_mapping(variables["mapping"], directory / "mapping.safetensors")
    return encoders, variables, directory, config


@pytest.fixture(scope="module")
def pipe(jax_side):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(jax_side[2] / "sd", safety_checker=None,
                                                   requires_safety_checker=False)


@pytest.fixture(scope="module")
def f2d(jax_side):
    _, _, directory, config = jax_side
    return Face2DiffusionEncoder.from_pretrained(msid=directory / "msid.pt", mapping=directory / "mapping.safetensors",
                                                 msid_heads=config.model.msid.num_heads)


def _jax_prompt_embeddings(encoders, variables, prompts, identity, expression=None):
    ids, positions = identifier_prompts(prompts)
    tokens = encoders.identity_tokens(variables, jnp.asarray(identity), expression)
    tokens = jnp.broadcast_to(tokens, (len(ids), *tokens.shape[1:]))
    return encoders.prompt_embeddings(variables, ids, positions, tokens)["context"]


# --------------------------------------------------------------------------- parity with the JAX path

@pytest.mark.slow
def test_msid_features_match_jax(jax_side, f2d, parity):
    encoders, variables, _, _ = jax_side
    faces = np.random.default_rng(1).uniform(-1, 1, (3, 112, 112, 3)).astype(np.float32)
    with torch.no_grad():
        ours = f2d.msid(torch.from_numpy(faces).permute(0, 3, 1, 2))
    parity("torch MSID from_pretrained vs JAX (tiny)",
           _max_err(ours, encoders.identity_features(variables, faces)), 1e-4)


@pytest.mark.parametrize("name, prompts, with_expression", [
    ("one prompt", PROMPTS[0], False), ("several prompts", PROMPTS, False),
    ("expression code", PROMPTS, True)])
@pytest.mark.slow
def test_prompt_embeds_match_jax(jax_side, f2d, pipe, parity, name, prompts, with_expression):
    encoders, variables, _, _ = jax_side
    rng = np.random.default_rng(2)
    identity = rng.normal(size=(1, f2d.msid.features)).astype(np.float32)
    expression = rng.normal(size=(1, 64)).astype(np.float32) if with_expression else None
    ours = f2d.prompt_embeds(pipe.text_encoder, pipe.tokenizer, prompts, torch.from_numpy(identity), expression)
    expected = _jax_prompt_embeddings(encoders, variables, prompts, identity, expression)
    assert ours.shape == expected.shape == (1 if isinstance(prompts, str) else len(prompts), 77, 32)
    parity(f"torch prompt_embeds vs JAX ({name})", _max_err(ours, expected), 1e-4)
    # The identity reaches the embedding: another identity changes it after "f".
    other = f2d.prompt_embeds(pipe.text_encoder, pipe.tokenizer, prompts, torch.from_numpy(-identity), expression)
    assert _max_err(other, ours) > 1e-3


@pytest.mark.slow
def test_one_identity_per_prompt(jax_side, f2d, pipe, parity):
    encoders, variables, _, _ = jax_side
    identity = np.random.default_rng(3).normal(size=(2, f2d.msid.features)).astype(np.float32)
    ours = f2d.prompt_embeds(pipe.text_encoder, pipe.tokenizer, PROMPTS[:2], identity)
    parity("torch prompt_embeds vs JAX (one identity per prompt)",
           _max_err(ours, _jax_prompt_embeddings(encoders, variables, PROMPTS[:2], identity)), 1e-4)


@pytest.mark.slow
def test_identity_from_photos(jax_side, f2d, parity):
    encoders, variables, _, _ = jax_side
    crop = align_face(FACE).crop
    expected = encoders.identity_features(variables, msid_input(crop[None]))
    parity("torch identity() of face.jpg vs JAX MSID", _max_err(f2d.identity(FACE), expected), 1e-4)
    # Several photos of one person: their MSID features are averaged; paths, PIL images and arrays all work.
    other = np.asarray(Image.open(OTHER_FACE).convert("RGB"))
    both = f2d.identity([Path(FACE), Image.fromarray(other)])
    assert both.shape == (1, f2d.msid.features)
    torch.testing.assert_close(both, (f2d.identity(FACE) + f2d.identity(other)) / 2, atol=1e-5, rtol=1e-5)


def test_end_to_end_diffusers_pipeline(f2d, pipe):
    identity = f2d.identity(FACE)
    embeds = f2d.prompt_embeds(pipe.text_encoder, pipe.tokenizer, PROMPTS[:2], identity)
    negative = text_embeds(pipe.text_encoder, pipe.tokenizer, ["", ""])
    out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, num_inference_steps=2, guidance_scale=7.0,
               output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 64, 64, 3)
    assert np.isfinite(out.images).all()


def test_pipeline_embeds_on_sd_v1(f2d, pipe):
    """On an SD v1 pipeline, pipeline_embeds is prompt_embeds plus the empty (or given) negative prompt's."""
    identity = f2d.identity(FACE)
    embeds = f2d.pipeline_embeds(pipe, PROMPTS[:2], identity)
    assert list(embeds) == ["prompt_embeds", "negative_prompt_embeds"]
    torch.testing.assert_close(embeds["prompt_embeds"],
                               f2d.prompt_embeds(pipe.text_encoder, pipe.tokenizer, PROMPTS[:2], identity),
                               atol=0, rtol=0)
    torch.testing.assert_close(embeds["negative_prompt_embeds"], text_embeds(pipe.text_encoder, pipe.tokenizer,
                                                                             ["", ""]), atol=0, rtol=0)
    negative = f2d.pipeline_embeds(pipe, PROMPTS[:2], identity, negative_prompt="blurry")["negative_prompt_embeds"]
    torch.testing.assert_close(negative, text_embeds(pipe.text_encoder, pipe.tokenizer, ["blurry"] * 2),
                               atol=0, rtol=0)


def test_negative_embeds_are_the_pipelines_empty_prompt(pipe):
    expected = pipe.encode_prompt("", "cpu", 1, False)[0]
    torch.testing.assert_close(text_embeds(pipe.text_encoder, pipe.tokenizer, ""), expected, atol=0, rtol=0)


def test_module_does_not_import_jax():
    script = ("import sys; import f2d_jax.torch; "
              "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'jaxlib', 'flax'}))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- errors

def test_prompt_without_identifier(f2d, pipe):
    identity = torch.zeros(1, f2d.msid.features)
    with pytest.raises(PromptError, match="the prompt has no identifier 'f l'.*'a photo of a person'"):
        f2d.prompt_embeds(pipe.text_encoder, pipe.tokenizer, ["a photo of f l", "a photo of a person"], identity)


def test_bad_identity_shapes(f2d, pipe):
    with pytest.raises(ValueError, match=r"identity must be \(B, 128\) MSID features .*got \(1, 5\)"):
        f2d.prompt_embeds(pipe.text_encoder, pipe.tokenizer, "a photo of f l", torch.zeros(1, 5))
    with pytest.raises(ValueError, match="3 identities for 2 prompts; give one or one per prompt"):
        f2d.prompt_embeds(pipe.text_encoder, pipe.tokenizer, PROMPTS[:2], torch.zeros(3, 128))


def test_mapping_for_another_text_encoder(f2d, pipe):
    from transformers import CLIPTextConfig, CLIPTextModel

    wide = CLIPTextModel(CLIPTextConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2)).eval()
    with pytest.raises(ValueError, match="writes 32-dim tokens but the text encoder is 48 wide"):
        f2d.prompt_embeds(wide, pipe.tokenizer, "a photo of f l", torch.zeros(1, 128))


def _load(directory, msid="msid.pt", mapping="mapping.safetensors", **kwargs):
    return Face2DiffusionEncoder.from_pretrained(msid=directory / msid, mapping=directory / mapping, **kwargs)


def test_missing_unexpected_and_mismatched_keys(jax_side, tmp_path):
    directory = jax_side[2]
    state = read_weights(directory / "mapping.safetensors")
    state.pop("null_exp")
    state["i2t_first.extra.weight"] = torch.zeros(3)
    state["i2t_last.fc_out.weight"] = torch.zeros(7, 64)
    torch.save(state, tmp_path / "mapping.pt")
    (tmp_path / "msid.pt").symlink_to(directory / "msid.pt")
    with pytest.raises(WeightsMismatchError) as info:
        _load(tmp_path, mapping="mapping.pt", msid_heads=2)
    message = str(info.value)
    assert f"mapping weights {tmp_path / 'mapping.pt'} does not fit the official structure" in message
    assert "1 missing keys: null_exp" in message
    assert "1 unexpected keys: i2t_first.extra.weight" in message
    assert "1 shape mismatches: i2t_last.fc_out.weight (7, 64) (model wants (32, 64))" in message


def test_msid_gaps_and_size_keys_are_listed(jax_side, tmp_path):
    directory = jax_side[2]
    state = read_weights(directory / "msid.pt")
    torch.save({k: v for k, v in state.items() if not k.startswith("blocks.2.")}, tmp_path / "gap.pt")
    with pytest.raises(WeightsMismatchError, match=r"missing keys: blocks\.2\.attn\.proj\.bias, "):
        _load(tmp_path, msid="gap.pt", mapping=directory / "mapping.safetensors", msid_heads=2)
    torch.save({k: v for k, v in state.items() if k != "patch_embed.proj.weight"}, tmp_path / "no_patch.pt")
    with pytest.raises(WeightsMismatchError, match=r"1 missing keys: patch_embed\.proj\.weight"):
        _load(tmp_path, msid="no_patch.pt", mapping=directory / "mapping.safetensors")


def test_official_sizes_and_head_count(jax_side, tmp_path):
    """Sizes come from the shapes; without msid_heads the official head size (32) is assumed."""
    directory = jax_side[2]
    encoder = _load(directory)
    assert [b.attn.heads for b in encoder.msid.blocks] == [1] * 4
    assert encoder.msid.taps == (0, 1, 2, 3) and encoder.mapping.null_exp.shape == (64,)
    with pytest.raises(ValueError, match="3 attention heads do not divide the width 32; pass msid_heads="):
        _load(directory, msid_heads=3)


def test_weight_file_errors(jax_side, tmp_path):
    directory = jax_side[2]
    with pytest.raises(FileNotFoundError, match="no weight file at .*nothing.pt"):
        _load(directory, msid=tmp_path / "nothing.pt")
    (tmp_path / "weights.h5").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"unknown weight format '\.h5'; expected a state dict \(\.pt, \.pth, "):
        _load(directory, msid=tmp_path / "weights.h5")
    torch.save({"epoch": 3}, tmp_path / "no_tensors.pt")
    with pytest.raises(ValueError, match=r"does not hold a state dict of tensors; top-level entries: \['epoch'\]"):
        _load(directory, msid=tmp_path / "no_tensors.pt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors could not be read as safetensors \(empty, truncated"):
        _load(directory, msid=tmp_path / "empty.safetensors")
    torch.save(MSID(width=96, depth=4, heads=3, taps=(0, 1, 2, 3)).state_dict(), tmp_path / "wide_msid.pt")
    with pytest.raises(ValueError, match="take 192 inputs, fewer than the 384 identity features .* do not belong"):
        _load(directory, msid=tmp_path / "wide_msid.pt", msid_heads=3)
