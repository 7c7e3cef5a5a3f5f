"""CLIP from a Hugging Face CLIPModel folder: our image tower (CLIPVisionEncoder) and text tower
(CLIPTextEncoder with its projection) against transformers' PyTorch CLIPModel at float32, the weight
formats, and a checkpoint that does not fit its config reported key by key."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from transformers import CLIPConfig, CLIPModel

from f2d_jax.convert.layout import CheckpointMismatchError
from f2d_jax.eval.clip_score import CLIP, ClipScorer, load_clip, preprocess
from f2d_jax.text import load_tokenizer

DATA = Path(__file__).resolve().parent / "data" / "hf_flax_clip_model"
TEXTS = ["a photo of a person", "a person looking shocked", "Fauvism painting of a person laughing a lot"]


def _clip_folder(folder, vision=None, text=None, seed=0) -> CLIPModel:
    """A tiny random CLIPModel written to `folder` (weights, config, the SD v1 tokenizer); every
    parameter is perturbed, so that biases and norm scales are not their initial zeros and ones."""
    torch.manual_seed(seed)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(small, vocab_size=49408, **(text or {})), projection_dim=24,
                        vision_config=dict(small, image_size=64, patch_size=16, **(vision or {})))
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    load_tokenizer().save_pretrained(folder)
    return model


def _features(model: CLIPModel, pixels: np.ndarray, texts):
    """transformers' get_image_features and get_text_features, unnormalized."""
    tokens = load_tokenizer()(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = model.visual_projection(model.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output)
        text = model.text_projection(model.text_model(**tokens).pooler_output)
    return image.numpy(), text.numpy(), tokens["input_ids"].numpy().astype(np.int32)


def _images() -> list[np.ndarray]:
    """Random landscape, portrait and square images, one for each of TEXTS."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(90, 120), (120, 80), (64, 64)]]


@pytest.mark.parametrize("weights, vision, text", [
    ("model.safetensors", {}, {}),
    ("pytorch_model.bin", dict(hidden_act="gelu", layer_norm_eps=1e-3), dict(hidden_act="gelu", layer_norm_eps=1e-4)),
])
def test_clip_features_and_score_match_transformers_pytorch(tmp_path, parity, weights, vision, text):
    """Max abs errors measured on CPU (features up to about 3 in size): image features 7.5e-7 (quick_gelu)
    and 1.2e-6 (gelu), text features 1.8e-6 and 1.5e-6, CLIP score 1.8e-7 and 1.4e-7."""
    model = _clip_folder(tmp_path, vision, text)
    if weights == "pytorch_model.bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(model.state_dict(), tmp_path / weights)
    scorer = ClipScorer.load(str(tmp_path))
    assert scorer.model.vision.activation == model.config.vision_config.hidden_act
    assert scorer.model.text.layer_norm_eps == model.config.text_config.layer_norm_eps
    images = _images()
    pixels = np.stack([preprocess(image, 64) for image in images])
    image, texts, ids = _features(model, pixels, TEXTS)
    ours_image = scorer.model.apply(scorer.variables, pixels.transpose(0, 2, 3, 1), method=CLIP.image_features)
    ours_text = scorer.model.apply(scorer.variables, ids, method=CLIP.text_features)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    theirs_score = np.sum(unit(image) * unit(texts), axis=-1)
    assert np.ptp(theirs_score) > 1e-2  # the pairs score differently
    case = f"tiny CLIP, {weights}, {model.config.vision_config.hidden_act}"
    parity(f"CLIP image features vs transformers PyTorch ({case})", np.abs(ours_image - image).max(), 1e-5)
    parity(f"CLIP text features vs transformers PyTorch ({case})", np.abs(ours_text - texts).max(), 1e-5)
    parity(f"CLIP score vs transformers PyTorch ({case})", np.abs(scorer.scores(images, TEXTS) - theirs_score).max(),
           1e-5)
    with pytest.raises(ValueError, match="images of 64x64 pixels, got 32x32"):
        scorer.model.apply(scorer.variables, np.zeros((1, 32, 32, 3), np.float32), method=CLIP.image_features)


def test_flax_msgpack_loads_as_the_pytorch_weights(tmp_path):
    """transformers' own PyTorch -> Flax conversion of a CLIPModel (Hugging Face's Flax layout: text_model/...,
    vision_model/..., both projections), shipped in tests/data/hf_flax_clip_model, loads into the same
    variables as its PyTorch weights."""
    for weights in ("flax_model.msgpack", "model.safetensors"):
        (tmp_path / weights).mkdir()
        for file in ("config.json", weights):
            (tmp_path / weights / file).write_bytes((DATA / file).read_bytes())
    model, from_flax = load_clip(str(tmp_path / "flax_model.msgpack"))
    assert (model.vision.activation, model.vision.image_size, model.text.vocab_size) == ("gelu", 32, 1000)
    _, from_torch = load_clip(str(tmp_path / "model.safetensors"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-7), from_flax, from_torch)


def test_a_sharded_checkpoint_loads_through_its_index(tmp_path):
    from safetensors.numpy import load_file, save_file

    state = load_file(DATA / "model.safetensors")
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / shard)
    weight_map = {k: shard for shard, names in shards.items() for k in names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_bytes((DATA / "config.json").read_bytes())
    _, sharded = load_clip(str(tmp_path))
    _, whole = load_clip(str(DATA))
    jax.tree.map(np.testing.assert_array_equal, sharded, whole)


def test_weights_that_do_not_fit_are_listed_key_by_key(tmp_path):
    from safetensors.numpy import load_file, save_file

    _clip_folder(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["vision_model.extra.weight"] = state.pop("visual_projection.weight")
    state["text_projection.weight"] = state["text_projection.weight"][:, :8]
    save_file(state, tmp_path / "model.safetensors")
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatchError) as error:
        load_clip(str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"CLIP weights {tmp_path / 'model.safetensors'} does not match the model:")
    assert "17 missing keys: vision_model.encoder.layers.2.layer_norm1.bias, " in message
    assert "visual_projection.weight" in message and "1 unexpected keys: vision_model.extra.weight" in message
    assert "1 shape mismatches: text_projection.weight (24, 8) (model wants (24, 32))" in message


def test_a_folder_without_clip_weights_or_a_file_is_a_clear_error(tmp_path):
    _clip_folder(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"no CLIP weights in {tmp_path}: expected one of model.safetensors"):
        ClipScorer.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="is a file; give a CLIP model directory or a hub id"):
        ClipScorer.load(str(tmp_path / "config.json"))
