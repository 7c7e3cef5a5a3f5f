"""f2d_jax.torch on SD 2.x and SDXL: `Face2DiffusionEncoder.pipeline_embeds` gives diffusers' pipelines the
keyword arguments their own encode_prompt would, with "f l" injected, and matches our JAX F2DPipeline."""
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

import sd_fixtures
from f2d_jax.config import load_config
from f2d_jax.convert import save_mapping, save_msid
from f2d_jax.encoders import Encoders
from f2d_jax.models.stable_diffusion import load_stable_diffusion
from f2d_jax.sampling import F2DPipeline
from f2d_jax.text import identifier_prompts, token_ids
from f2d_jax.torch import Face2DiffusionEncoder, pipeline_text_encoders, text_transformer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"sd2": ROOT / "configs" / "tiny_sd2.py", "sdxl": ROOT / "configs" / "tiny_sdxl.py"}
FACE = str(ROOT / "f2d_jax" / "assets" / "face.jpg")
PROMPTS = ["a photo of f l", "f l eating bread in front of the Eiffel Tower, highly detailed"]
NEGATIVE = "blurry, low quality"


def _max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """base -> (our F2DPipeline, the diffusers pipeline loaded from the tiny directory, the PyTorch
    Face2DiffusionEncoder from the exported weights), for "sd2" and "sdxl"."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    root = tmp_path_factory.mktemp("torch_bases")
    rng = np.random.default_rng(0)
    out = {}
    for i, (base, config) in enumerate(CONFIGS.items()):
        sd_fixtures.write_tiny_base(root / base, base, seed=10 * i)
        model = load_config(str(config)).model
        encoders = Encoders.from_config(model, load_stable_diffusion(root / base)[0].text_encoders)
        variables = encoders.init(jax.random.key(7), ("msid", "mapping"))
        # Every leaf non-trivial (BatchNorm statistics, norm scales, null_exp), running variances positive.
        variables = jax.tree.map(lambda x: x * rng.uniform(0.5, 1.5, x.shape) + rng.uniform(-0.1, 0.1, x.shape),
                                 variables)
        msid, mapping = root / f"{base}_msid.pt", root / f"{base}_mapping.safetensors"
        save_msid(variables["msid"], msid)
        save_mapping(variables["mapping"], mapping)
        ours = F2DPipeline.from_pretrained(sd=str(root / base), msid=str(msid), mapping=str(mapping),
                                           config=str(config), dtype="float32")
        f2d = Face2DiffusionEncoder.from_pretrained(msid=msid, mapping=mapping, msid_heads=model.msid.num_heads)
        pipe = (StableDiffusionXLPipeline.from_pretrained(root / base, add_watermarker=False) if base == "sdxl" else
                StableDiffusionPipeline.from_pretrained(root / base, safety_checker=None,
                                                        requires_safety_checker=False))
        out[base] = ours, pipe, f2d
    return out


def _jax_embeds(ours, prompts, negative_prompt=None) -> dict[str, np.ndarray]:
    """Our JAX pipeline's conditioning and unconditional branch, named as diffusers' keyword arguments."""
    cond = ours.encode_prompt(FACE, prompts)
    uncond = ours.models.sd.negative_conditioning(
        ours.programs.embed(ours.variables, token_ids([negative_prompt or ""] * len(prompts), ours.tokenizer)), negative_prompt)
    out = dict(prompt_embeds=cond["context"], negative_prompt_embeds=uncond["context"])
    if "text_embeds" in cond:
        out.update(pooled_prompt_embeds=cond["text_embeds"], negative_pooled_prompt_embeds=uncond["text_embeds"])
    return {name: np.asarray(value) for name, value in out.items()}


@pytest.mark.parametrize("negative_prompt", [None, "", NEGATIVE],
                         ids=["no negative prompt", "empty negative prompt", "negative prompt"])
@pytest.mark.parametrize("base", ["sd2", "sdxl"])
def test_pipeline_embeds_match_jax(bases, parity, base, negative_prompt):
    ours, pipe, f2d = bases[base]
    theirs = f2d.pipeline_embeds(pipe, PROMPTS, f2d.identity(FACE), negative_prompt=negative_prompt)
    expected = _jax_embeds(ours, PROMPTS, negative_prompt)
    assert set(theirs) == set(expected) == ({"prompt_embeds", "negative_prompt_embeds"} | (
        {"pooled_prompt_embeds", "negative_pooled_prompt_embeds"} if base == "sdxl" else set()))
    width = 80 if base == "sdxl" else 32
    assert theirs["prompt_embeds"].shape == theirs["negative_prompt_embeds"].shape == (2, 77, width)
    if base == "sdxl":
        assert theirs["pooled_prompt_embeds"].shape == theirs["negative_pooled_prompt_embeds"].shape == (2, 48)
        # no negative prompt: zeros, as diffusers' force_zeros_for_empty_prompt; an empty one is encoded
        for name in ("negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            assert bool(theirs[name].any()) == (negative_prompt is not None), name
    label = {None: "no negative prompt", "": "empty negative prompt"}.get(negative_prompt, "negative prompt")
    parity(f"torch pipeline_embeds vs JAX encode_prompt ({base}, {label})",
           max(_max_err(theirs[name], expected[name]) for name in expected), 1e-5)


@pytest.mark.parametrize("base", ["sd2", "sdxl"])
def test_plain_text_is_the_pipelines_encode_prompt(bases, base, monkeypatch):
    """Injecting the embeddings the text encoders compute anyway at "f l" (token + position) reproduces
    the pipeline's own encode_prompt exactly, negative branches included: ids, padding, layers, pooling."""
    _, pipe, f2d = bases[base]
    tokens = []
    for encoder, tokenizer in pipeline_text_encoders(pipe):
        ids, positions = identifier_prompts(PROMPTS, tokenizer)
        with torch.no_grad():
            embedded = text_transformer(encoder).embeddings(torch.as_tensor(ids, dtype=torch.long))
        tokens.append(torch.stack([embedded[row, p:p + 2] for row, p in enumerate(positions)]))
    monkeypatch.setattr(f2d, "identity_tokens", lambda identity, expression=None: torch.cat(tokens, -1))
    for negative_prompt in (None, NEGATIVE):
        ours = f2d.pipeline_embeds(pipe, PROMPTS, None, negative_prompt=negative_prompt)
        with torch.no_grad():
            theirs = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                        do_classifier_free_guidance=True,
                                        negative_prompt=negative_prompt and [negative_prompt] * len(PROMPTS))
        names = ["prompt_embeds", "negative_prompt_embeds"] if base == "sd2" else \
            ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
        assert list(ours) == names
        for name, value in zip(names, theirs):
            torch.testing.assert_close(ours[name], value, atol=0, rtol=0, msg=f"{base} {name} ({negative_prompt})")


def test_sdxl_mapping_loads_strictly_with_80_wide_tokens(bases):
    _, pipe, f2d = bases["sdxl"]
    assert f2d.mapping.i2t_first.fc_out.weight.shape[0] == f2d.mapping.i2t_last.fc_out.weight.shape[0] == 32 + 48
    assert f2d.identity_tokens(torch.zeros(1, f2d.msid.features)).shape == (1, 2, 80)
    assert [encoder.config.hidden_size for encoder, _ in pipeline_text_encoders(pipe)] == [32, 48]


def test_mapping_for_another_pipeline(bases):
    sd2, sdxl = bases["sd2"][2], bases["sdxl"][2]
    with pytest.raises(ValueError, match="writes 32-dim tokens but the text encoders are 32 [+] 48 = 80 wide "
                                         "together: weights for another Stable Diffusion"):
        sd2.pipeline_embeds(bases["sdxl"][1], PROMPTS, torch.zeros(1, sd2.msid.features))
    with pytest.raises(ValueError, match="writes 80-dim tokens but the text encoder is 32 wide"):
        sdxl.pipeline_embeds(bases["sd2"][1], PROMPTS, torch.zeros(1, sdxl.msid.features))
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts; give one or one per prompt"):
        sd2.pipeline_embeds(bases["sd2"][1], PROMPTS, torch.zeros(1, sd2.msid.features), negative_prompt=["a"] * 3)


def test_end_to_end_sdxl_pipeline(bases):
    """diffusers' StableDiffusionXLPipeline, loaded from the tiny directory, runs on pipeline_embeds alone."""
    _, pipe, f2d = bases["sdxl"]
    embeds = f2d.pipeline_embeds(pipe, PROMPTS, f2d.identity(FACE))
    out = pipe(**embeds, num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 64, 64, 3)
    assert np.isfinite(out.images).all()
