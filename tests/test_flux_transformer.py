"""FLUX.1's transformer (f2d_jax.models.flux): parity with diffusers' PyTorch FluxTransformer2DModel on the
same random weights (FLUX.1-dev's structure, with the guidance embedding, and FLUX.1-schnell's, without),
the published configs' sizes, loading a transformer folder, a pipeline folder, shards and a hub id, saving a
folder diffusers loads, errors, remat and bfloat16."""
import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

import sd_fixtures
from f2d_jax.convert.layout import CheckpointMismatchError
from f2d_jax.models import flux
from f2d_jax.models.sd_bundle import abstract_module
from f2d_jax.models.sd_config import UnsupportedConfigError

DEV = flux.TINY_FLUX_TRANSFORMER
SCHNELL = {**flux.TINY_FLUX_TRANSFORMER, "guidance_embeds": False}


def _max_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _torch_transformer(config: dict, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return sd_fixtures.randomize(FluxTransformer2DModel(**config), seed)


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """(folder, the PyTorch model saved there) of the tiny FLUX.1-dev structure."""
    path = tmp_path_factory.mktemp("flux-dev")
    model = _torch_transformer(DEV)
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def schnell(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux-schnell")
    model = _torch_transformer(SCHNELL, seed=1)
    model.save_pretrained(path)
    return path, model


def _inputs(guidance: bool, height: int = 4, width: int = 6, text: int = 5, seed: int = 0) -> dict:
    """Batch-2 inputs as FluxPipeline passes them: packed latents with the image ids of their latent grid,
    text tokens with zero ids, timesteps in (0, 1), guidance 3.5."""
    from diffusers import FluxPipeline

    rng = np.random.default_rng(seed)
    c = DEV
    inputs = dict(
        hidden_states=rng.standard_normal((2, height * width, c["in_channels"])).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((2, text, c["joint_attention_dim"])).astype(np.float32),
        pooled_projections=rng.standard_normal((2, c["pooled_projection_dim"])).astype(np.float32),
        timestep=np.array([0.3, 0.85], np.float32),
        img_ids=FluxPipeline._prepare_latent_image_ids(2, height, width, "cpu", torch.float32).numpy(),
        txt_ids=np.zeros((text, 3), np.float32))
    if guidance:
        inputs["guidance"] = np.full((2,), 3.5, np.float32)
    return inputs


def _torch_output(model, inputs: dict) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in inputs.items()}).sample.numpy()


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, inputs: dict):
    """module.apply, compiled once per module config and input shapes (equal modules hash alike)."""
    return module.apply(params, **inputs)


@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_parity_with_diffusers(name, request, parity):
    folder, model = request.getfixturevalue(name)
    module, params = flux.load_transformer(folder)
    assert module.guidance_embeds == (name == "dev")
    inputs = _inputs(module.guidance_embeds)
    expected = _torch_output(model, inputs)
    out = _apply(module, params, inputs)
    assert out.shape == expected.shape == (2, 24, 64)
    parity(f"FLUX transformer tiny ({name} structure)", _max_err(out, expected), 1e-4)


def test_batched_ids_take_the_first_row(dev):
    module, params = flux.load_transformer(dev[0])
    inputs = _inputs(True)
    batched = {**inputs, **{k: np.stack([inputs[k]] * 2) for k in ("img_ids", "txt_ids")}}
    np.testing.assert_array_equal(_apply(module, params, batched), _apply(module, params, inputs))


def test_parameter_tree_carries_diffusers_names():
    tree = abstract_module(flux.FluxTransformer2DModel(**DEV))["params"]
    paths = {"/".join(p) for p in traverse_util.flatten_dict(tree)}
    for path in ("transformer_blocks_0/attn/to_q/kernel", "transformer_blocks_1/attn/norm_added_k/scale",
                 "transformer_blocks_0/ff_context/net_0/proj/kernel", "single_transformer_blocks_1/proj_mlp/kernel",
                 "time_text_embed/guidance_embedder/linear_2/bias", "norm_out/linear/kernel", "proj_out/bias"):
        assert path in paths


@pytest.mark.slow
def test_published_configs_have_diffusers_parameter_counts():
    from diffusers import FluxTransformer2DModel

    for config in (flux.FLUX_DEV_TRANSFORMER, flux.FLUX_SCHNELL_TRANSFORMER):
        module = flux.FluxTransformer2DModel(**config)
        assert module.config == config
        leaves = jax.tree.leaves(abstract_module(module))
        with torch.device("meta"):
            reference = list(FluxTransformer2DModel(**config).parameters())
        assert len(leaves) == len(reference)
        assert sum(int(np.prod(x.shape)) for x in leaves) == sum(p.numel() for p in reference)


def _same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_load_pipeline_folder_and_shards(dev, tmp_path):
    folder, model = dev
    _, params = flux.load_transformer(folder)
    pipeline = tmp_path / "pipeline"
    shutil.copytree(folder, pipeline / "transformer")
    (pipeline / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    _same_params(flux.load_transformer(pipeline)[1], params)

    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / flux.SHARDED_WEIGHTS_FILE).is_file() and not (sharded / flux.WEIGHTS_FILE).exists()
    assert len(list(sharded.glob("diffusion_pytorch_model-*.safetensors"))) > 1
    _same_params(flux.load_transformer(sharded)[1], params)


def test_hub_id_downloads_the_transformer_alone(dev, tmp_path, monkeypatch):
    import huggingface_hub

    pipeline = tmp_path / "snapshot"
    shutil.copytree(dev[0], pipeline / "transformer")
    asked = []

    def snapshot_download(name, revision=None, allow_patterns=()):
        asked.append((name, revision, list(allow_patterns)))
        return str(pipeline)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    module, _ = flux.load_transformer("black-forest-labs/FLUX.1-dev", revision="main")
    assert module.guidance_embeds
    [(name, revision, patterns)] = asked
    assert (name, revision) == ("black-forest-labs/FLUX.1-dev", "main")
    assert {"transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
            "transformer/diffusion_pytorch_model.safetensors.index.json",
            "transformer/diffusion_pytorch_model-*.safetensors"} <= set(patterns)
    assert all(p.startswith("transformer/") or "/" not in p for p in patterns)


def test_save_transformer_loads_in_diffusers(dev, tmp_path, parity):
    from diffusers import FluxTransformer2DModel

    folder, model = dev
    module, params = flux.load_transformer(folder)
    saved = flux.save_transformer(module, params, tmp_path / "saved")
    reloaded = FluxTransformer2DModel.from_pretrained(saved).eval()
    assert json.loads((saved / "config.json").read_text())["_class_name"] == "FluxTransformer2DModel"
    state, expected = reloaded.state_dict(), model.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    inputs = _inputs(True, seed=1)
    parity("FLUX transformer tiny, saved and loaded by diffusers", _max_err(
        _apply(module, params, inputs), _torch_output(reloaded, inputs)), 1e-4)


def test_folder_errors(dev, schnell, tmp_path):
    with pytest.raises(FileNotFoundError, match="no FluxTransformer2DModel folder at"):
        flux.load_transformer(tmp_path / "absent")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no transformer config at .*transformer/config.json") as error:
        flux.load_transformer(empty)
    assert isinstance(error.value, flux.TransformerFolderError)

    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(dev[0] / "config.json", no_weights)
    with pytest.raises(flux.TransformerFolderError, match="no transformer weights in .*diffusion_pytorch_model"):
        flux.load_transformer(no_weights)

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "in_channels": 4}))
    with pytest.raises(UnsupportedConfigError, match="'UNet2DConditionModel'; expected a FluxTransformer2DModel"):
        flux.load_transformer(other)

    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({**DEV, "qk_norm": "layer_norm"}))
    with pytest.raises(UnsupportedConfigError, match="unknown option qk_norm"):
        flux.load_transformer(unknown)

    mismatched = tmp_path / "mismatched"
    mismatched.mkdir()
    shutil.copy(dev[0] / "config.json", mismatched)   # guidance_embeds, with schnell's weights
    shutil.copy(schnell[0] / flux.WEIGHTS_FILE, mismatched)
    with pytest.raises(CheckpointMismatchError, match="time_text_embed.guidance_embedder.linear_1.weight"):
        flux.load_transformer(mismatched)


@pytest.mark.parametrize("config, guidance, message", [
    (DEV, None, "embeds the guidance scale .*pass guidance"),
    (SCHNELL, np.full((1,), 3.5, np.float32), "has no guidance embedding .*pass guidance=None"),
])
def test_guidance_errors(config, guidance, message):
    module = flux.FluxTransformer2DModel(**config)
    inputs = module.example_inputs()[:-1] + (guidance,)
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(module.init, jax.random.key(0), *inputs)


@pytest.mark.slow
def test_remat_changes_neither_output_nor_gradient(dev):
    module, params = flux.load_transformer(dev[0])
    inputs = _inputs(True)

    def value_and_grad(remat: bool):
        m = module.clone(remat=remat, remat_policy="dots_saveable" if remat else module.remat_policy)
        loss = lambda x: jnp.sum(jnp.sin(m.apply(params, **{**inputs, "hidden_states": x})))  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(inputs["hidden_states"])

    (value, grad), (remat_value, remat_grad) = value_and_grad(False), value_and_grad(True)
    assert _max_err(value, remat_value) <= 1e-5 * abs(float(value)) + 1e-5
    assert _max_err(grad, remat_grad) <= 1e-5 and float(jnp.max(jnp.abs(grad))) > 0


def test_bfloat16_runs_and_stays_close(dev):
    module, params = flux.load_transformer(dev[0])
    module16, params16 = flux.load_transformer(dev[0], dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    inputs = _inputs(True)
    reference, out = _apply(module, params, inputs), _apply(module16, params16, inputs)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out).all())
    assert _max_err(out, reference) <= 0.05 * float(jnp.max(jnp.abs(reference)))
