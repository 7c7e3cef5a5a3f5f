"""F2DPipeline: face photo(s) + a prompt with "f l" -> images, in JAX.

    pipe = F2DPipeline.from_pretrained(sd="CompVis/stable-diffusion-v1-4", msid="msid.pt", mapping="mapping.pt")
    images = pipe("face.jpg", "f l eating bread in front of the Eiffel Tower", num_images=8, seed=0)
    pipe.save_pretrained("my-model")                       # one folder: F2DPipeline.from_pretrained(model="my-model")

    photos -> aligned 112 crops -> MSID features, averaged over the photos
           -> mapping(identity, expression code | null_exp) -> "f l" tokens
    prompt ids with the tokens at "f" -> CLIP -> conditioning;  negative prompt -> CLIP -> unconditional
    noise -> [UNet + classifier-free guidance + scheduler] x steps -> VAE decode

The base (SD 1.x, 2.x or SDXL) is the Stable Diffusion directory's; size, sampler and guidance default
to the base's usual ones (`F2DPipeline.defaults`). A conditioning is a dict: {"context": (N, 77, D)},
and for SDXL also "text_embeds" (N, 1280), bigG's projected pooled state; SDXL's size conditioning
(time ids) comes from the height and width sampled.

Images are made `batch_size` at a time (the last batch padded, so the programs serve every batch):
the memory a call needs does not grow with the number of images. The set-up of a batch, one
denoising step and the decode are three jitted programs, the batch sharded over the local devices,
cached per (scheduler, steps, batch, size): a second call with the same shapes does not recompile.
A Python loop dispatches the steps, all in one call without a progress bar and about a tenth of
them per call with one; it waits for each call's steps once the next call is queued, and moves the
bar. No program has a host callback: JAX's persistent compilation cache stores them all.
"""
from __future__ import annotations

import dataclasses
import math
import operator
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from f2d_jax import InputWarning
from f2d_jax.bundle import Models, abstract_models, compute_dtype, load_models
from f2d_jax.models.flux_bundle import is_flux
from f2d_jax.config import MAX_SEED, OFFICIAL_CONFIG, config_from_dict, f2d_config, load_config
from f2d_jax.convert.package import FILES, is_package, package_weights, save_package
from f2d_jax.faces import AlignedFace, align_face, expression_input, msid_input
from f2d_jax.compiled import TargetProgram
from f2d_jax.params import with_trained
from f2d_jax.sampling.flow_match import flow_schedule
from f2d_jax.sampling.loop import decode_images, flux_start, flux_steps, start, steps
from f2d_jax.sampling.schedulers import make_scheduler
from f2d_jax.targets import on_mesh, platform
from f2d_jax.text import CLASS_WORDS
from f2d_jax.workdir import check_f2d_run, is_workdir, load_trained

DEFAULT_SD = "CompVis/stable-diffusion-v1-4"
FLUX_CONFIG = "f2d_flux"   # the model sizes of a FLUX.1 base given without a config
# Fits SD v1.4 at 512 px on a 16 GB accelerator: 8 images are 16 UNet rows with classifier-free guidance,
# about 5 GiB of bfloat16 activations (XLA assigns 10.2 GiB in float32) and 1.7 GiB of UNet and VAE weights.
DEFAULT_BATCH_SIZE = 8
FaceInput = str | os.PathLike | np.ndarray | Image.Image | AlignedFace


class WeightsError(ValueError):
    """Weights the pipeline needs are missing or do not fit."""


def base_defaults(sd) -> dict[str, Any]:
    """Sampling defaults of a base: the official Face2Diffusion settings on SD 1.x (Euler
    ancestral, guidance 7), diffusers' defaults on SD 2.x and SDXL (their scheduler's sampler, guidance 7.5
    and 5) and FLUX.1 (the flow-matching Euler sampler, the guidance embedding at 3.5 on dev; schnell has
    none); images of the size the base was trained at."""
    if sd.base == "flux":
        sampler, guidance = "euler", 3.5 if sd.guidance_embeds else 0.0
    elif sd.base == "sd1":
        sampler, guidance = "euler_a", 7.0
    else:
        sampler = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                   "DPMSolverMultistepScheduler": "dpm++2m"}.get(sd.scheduler_config.get("_class_name"), "ddim")
        guidance = 5.0 if sd.base == "sdxl" else 7.5
    return dict(scheduler=sampler, guidance_scale=guidance, height=sd.default_size, width=sd.default_size)


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _align(image: FaceInput, detector=None) -> AlignedFace:
    if isinstance(image, AlignedFace):
        return image
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return align_face(image, detector=detector)


def check_size(height: int, width: int, multiple: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value < multiple or value % multiple:
            raise ValueError(f"{name}={value} is not possible: height and width must be positive multiples of "
                             f"{multiple} (for this model's VAE and UNet)")


def check_sampling(steps: int, guidance_scale: float | None, scheduler: str | None,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> None:
    """The checks of the sampling settings that need no weights (`steps` against Stable Diffusion's 1000
    training timesteps; the model's own scheduler config is checked again when sampling). None: the
    base's default, checked once the model is loaded."""
    make_scheduler(scheduler or "euler_a", {}, steps)
    if guidance_scale is not None and not math.isfinite(guidance_scale):
        raise ValueError(f"the guidance scale must be a finite number, got {guidance_scale}")
    if batch_size < 1:
        raise ValueError(f"the batch size must be at least 1, got {batch_size}")


def check_true_cfg(scale: float, negative_prompt: str | None) -> None:
    """FLUX.1's true classifier-free guidance: a scale of at least 1 (1: none); a negative prompt only with a
    scale above 1, where it is what the guidance moves away from."""
    if not (math.isfinite(scale) and scale >= 1):
        raise ValueError(f"the true classifier-free guidance scale must be a finite number of at least 1 (1: none), "
                         f"got {scale}")
    if negative_prompt is not None and scale == 1:
        raise ValueError("FLUX.1 reads a negative prompt only with true classifier-free guidance: give a true CFG "
                         "scale above 1 (--true-cfg 4, true_cfg_scale=4.0), or no negative prompt")


def check_identity_scale(scale: float) -> None:
    """A ValueError for an identity scale that is negative or not finite."""
    if not (math.isfinite(scale) and scale >= 0):
        raise ValueError(f"the identity scale must be a finite number of at least 0 (0: the class "
                         f"{CLASS_WORDS!r}, 1: the person as trained), got {scale}")


def seed_range(seed: int, num_images: int) -> np.ndarray:
    """(num_images,) uint32 seeds seed, seed + 1, ...: image j of a prompt uses seed + j."""
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    last = seed + num_images - 1
    if not 0 <= seed <= last <= MAX_SEED:
        uses = f"{seed}" if num_images == 1 else f"{seed} to {last} (image j uses seed + j, for {num_images} images)"
        raise ValueError(f"seeds must be between 0 and {MAX_SEED} (2^32 - 1), got {uses}")
    return np.arange(seed, last + 1, dtype=np.uint32)


def as_seeds(seeds: Sequence[int]) -> np.ndarray:
    """(N,) uint32 seeds; a seed outside 0..2^32 - 1 is a ValueError, not wrapped onto another."""
    seeds = [operator.index(s) for s in np.ravel(np.asarray(seeds, dtype=object))]
    outside = [s for s in seeds if not 0 <= s <= MAX_SEED]
    if outside:
        raise ValueError(f"seeds must be between 0 and {MAX_SEED} (2^32 - 1), got {outside[0]}")
    return np.asarray(seeds, np.uint32)


class NonFiniteImagesError(ValueError):
    """Sampling gave NaN or infinite values: a picture of them would be black, not an image."""


def _check_finite(finite: np.ndarray, first: int, seeds: np.ndarray, guidance_scale: float) -> None:
    """A NonFiniteImagesError unless every image from index `first` on came out finite."""
    if not finite.all():
        bad = first + np.flatnonzero(~finite)[:8]
        raise NonFiniteImagesError(
            f"images {', '.join(f'{i} (seed {seeds[i]})' for i in bad)} came out NaN or infinite, so none was kept; "
            f"check the weights (a NaN in them, or a run that diverged), the guidance scale ({guidance_scale:g}) and "
            "the dtype (float16 overflows on some models: use --dtype float32 or bfloat16)")


def with_weights(config, **weights) -> ml_collections.ConfigDict:
    """A copy of `config` (a ConfigDict, or a dict as a checkpoint stores it) whose weights paths are the
    non-empty ones of `weights` (sd=, msid=, mapping=, expression=) in place of its own."""
    config = config_from_dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)
    config.weights.update({k: str(v) for k, v in weights.items() if v})
    return config


@dataclasses.dataclass(frozen=True)
class Programs:
    """The pipeline's jitted programs over a mesh of one host's devices ("data": the batch)."""
    identity: Any      # (variables, (N, 112, 112, 3) faces) -> (N, F) MSID features
    expression: Any    # (variables, (N, 224, 224, 3)) -> (N, 64) expression codes
    embed: Any         # (variables, (N, 77) ids) -> conditioning
    condition: Any     # see `condition`
    start: Any         # a batch's set-up: sampling.loop.start
    generate: Any      # denoising steps first .. last - 1 of a batch: sampling.loop.steps
    decode: Any        # latents -> (images, finite)


def condition(encoders, variables, identity, expression, ids, positions, class_ids, identity_scale):
    """The conditioning of prompts `ids` (N, 77) with the person's "f l" tokens at `positions`: identity
    (1, F) and expression (1, 64) or None (null_exp), `identity_scale` toward `class_ids` (FLUX: ids, positions
    and class ids are dicts by encoder)."""
    n = jax.tree.leaves(ids)[0].shape[0]
    identity = jnp.broadcast_to(identity, (n, identity.shape[-1]))
    expression = None if expression is None else jnp.broadcast_to(expression, (n, expression.shape[-1]))
    tokens = encoders.identity_tokens(variables, identity, expression)
    tokens = encoders.scaled_identity_tokens(variables, tokens, ids, positions, class_ids, identity_scale)
    return encoders.prompt_embeddings(variables, ids, positions, tokens)


def denoising(sd) -> tuple[Callable, Callable]:
    """A base's (`start`, `steps`): the UNet's with a scheduler, or FLUX.1's flow-matching ones."""
    if sd.base == "flux":
        return partial(flux_start, sd), partial(flux_steps, sd)
    return partial(start, sd.unet), partial(steps, sd.unet)


def schedule_for(sd, scheduler: str, steps: int, height: int, width: int):
    """The schedule a base's steps take: the scheduler's state, or FLUX.1's (steps + 1,) sigmas for the size."""
    if sd.base == "flux":
        if scheduler != "euler":
            raise ValueError(f"scheduler {scheduler!r}: FLUX.1 samples with the flow-matching Euler sampler "
                             "('euler') only")
        tokens = (height // sd.size_multiple) * (width // sd.size_multiple)
        return jnp.asarray(flow_schedule(steps, tokens, sd.scheduler_config)[1])
    return make_scheduler(scheduler, sd.scheduler_config, steps)


def programs(models: Models, mesh: Mesh) -> Programs:
    """The programs, traced on `mesh` (the kernels and shardings of its platform): the encoders compile once
    per input shape; a batch's set-up, each denoising step (the program generation repeats) and its decode
    take and give the batch sharded over the devices. FLUX.1's set-up and steps are the flow-matching ones
    (`sampling.loop.flux_start`, `flux_steps`), with the same arguments."""
    replicated, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    encoders, sd = models.encoders, models.sd
    jit = lambda fn, **shardings: jax.jit(on_mesh(fn, mesh), **shardings)  # noqa: E731
    first, generate = denoising(sd)
    return Programs(
        identity=jit(encoders.identity_features), expression=jit(encoders.expression_codes),
        embed=jit(encoders.prompt_embeddings), condition=jit(partial(condition, encoders)),
        start=jit(first, out_shardings=batch), generate=jit(generate, out_shardings=batch),
        decode=jit(partial(decode_images, sd.vae, scaling_factor=sd.vae_scaling_factor),
                   out_shardings=replicated))


def target_programs(config, devices, batch_per_device: int, *, dtype: str = "auto", steps: int = 30,
                    scheduler: str | None = None, height: int | None = None, width: int | None = None
                    ) -> list[TargetProgram]:
    """The pipeline's denoising step (the UNet on the batch and its unconditional twin) and decode, over one
    host's part of `devices` (a compile target's: the pipeline runs per host) at `batch_per_device` images per
    device, from abstract parameters (f2d_jax/compiled.py compiles them). Settings left None: the base's."""
    host = [d for d in devices if d.process_index == devices[0].process_index]
    mesh = Mesh(np.asarray(host), ("data",))
    models, variables = abstract_models(config, compute_dtype(dtype, platform(mesh)), ("msid", "mapping"))
    sd = models.sd
    defaults = base_defaults(sd)
    height = height or config.data.resolution or defaults["height"]
    width = width or height
    check_size(height, width, sd.size_multiple)
    schedule = schedule_for(sd, scheduler or defaults["scheduler"], steps, height, width)
    n = batch_per_device * mesh.size
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    def laid_out(tree, sharding):
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

    ids = jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape[1:]), jnp.int32), sd.plain_ids([""]))
    conditioning = laid_out(jax.eval_shape(lambda v, i: sd.with_size(models.encoders.prompt_embeddings(v, i), height,
                                                                      width), variables, ids), batch)
    factor = sd.vae_scale_factor
    noise = jax.ShapeDtypeStruct((n, sd.latent_channels, height // factor, width // factor), jnp.float32,
                                 sharding=batch)
    keys = laid_out(jax.eval_shape(lambda: jax.vmap(jax.random.key)(jnp.zeros((n,), jnp.uint32))), batch)
    schedule = laid_out(schedule, rep)
    contexts, keys, (x, memory) = laid_out(jax.eval_shape(denoising(sd)[0], schedule, noise, conditioning,
                                                          conditioning, keys), batch)
    progs = programs(models, mesh)
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=rep)  # noqa: E731
    guidance = jax.ShapeDtypeStruct((2,) if sd.base == "flux" else (), jnp.float32, sharding=rep)  # as `sample`'s
    generate = (laid_out(variables[sd.denoiser], rep), schedule, contexts, guidance, keys,
                scalar(jnp.int32), scalar(jnp.int32), x, memory)
    return [TargetProgram("denoising step", progs.generate, generate, batch_per_device, mesh),
            TargetProgram("decode", progs.decode, (laid_out(variables["vae"], rep), x), batch_per_device, mesh)]


def compile_sampling_for_target(args, config) -> int:
    """--target of the commands that sample (f2d-sample, f2d-eval generate; `args`: their options): the
    pipeline's denoising step and decode at --batch-size images, compiled for one host of the target's chips
    (the pipeline runs per host)."""
    from f2d_jax import targets
    from f2d_jax.usage import compile_for_target

    check_sampling(args.steps, args.guidance, args.scheduler, args.batch_size)
    target = targets.parse(args.target)
    build = partial(target_programs, config, dtype=args.dtype, steps=args.steps, scheduler=args.scheduler,
                    height=args.height, width=args.width)
    return compile_for_target(args, build, -(-args.batch_size // target.devices_per_host))


class F2DPipeline:
    """Face2Diffusion generation. Build it with `from_pretrained`, `from_checkpoint` or `from_config`."""

    def __init__(self, models: Models, variables: dict[str, Any], config: ml_collections.ConfigDict | None = None,
                 detector=None):
        self.models, self.config, self.detector = models, config, detector
        self.checkpoint = None  # (workdir, step) where the trained weights come from (`from_checkpoint`)
        self.mesh = Mesh(np.asarray(jax.local_devices()), ("data",))
        self._replicated = NamedSharding(self.mesh, P())
        self._batch = NamedSharding(self.mesh, P("data"))
        self.variables = jax.device_put(variables, self._replicated)
        self.tokenizer = models.sd.tokenizer()
        self.class_ids = models.sd.class_ids()  # "a person": identity scale 0
        self.defaults = base_defaults(models.sd)
        self.size_multiple = models.sd.size_multiple
        self.programs = programs(models, self.mesh)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config, dtype: str = "auto", log: Callable[[str], None] | None = None) -> F2DPipeline:
        """From a config file or ConfigDict: model sizes in `model`, weights in `weights` (empty: random
        init, as the `tiny` config uses; an empty weights.sd is the tiny random Stable Diffusion). The
        expression encoder loads only with weights.expression: a random one would give a meaningless code."""
        config = f2d_config(config, config if isinstance(config, (str, os.PathLike)) else "the config")
        log = log or (lambda msg: print(msg, file=sys.stderr))
        names = ("msid", "mapping", "expression") if config.weights.expression else ("msid", "mapping")
        models, variables = load_models(config, compute_dtype(dtype), names, log=log)
        return cls(models, variables, config)

    @classmethod
    def from_pretrained(cls, sd: str | None = None, mapping: str | None = None, msid: str | None = None,
                        expression: str | None = None, *, model=None, config=None, dtype: str = "auto") -> F2DPipeline:
        """`model`: a packaged model's folder (`save_pretrained`, `f2d-convert package`): its config and
        weights, on the base it names. Without it: the base `sd`, Stable Diffusion (default
        CompVis/stable-diffusion-v1-4) or FLUX.1, from a local diffusers directory or hub id; MSID and mapping weights
        as the official .pt / .safetensors, our .msgpack or an `f2d_jax.convert import` directory; `mapping`
        may also be a training workdir (its latest checkpoint). `expression`: Deep3DFaceRecon's checkpoint,
        needed only for `expression_image`. `config`: model sizes (default: the paper's, f2d_flux's on FLUX.1).
        With `model`, the weights given replace the folder's (sd= when its base is a path on another machine)."""
        if model is not None:
            if config is not None:
                raise WeightsError("a packaged model brings its own config: give model= or config=, not both")
            weights = package_weights(model)  # first: it says what is wrong with a folder that is no package
            given = dict(sd=sd, msid=msid, mapping=mapping, expression=expression)
            weights.update((k, v) for k, v in given.items() if v)
            return cls.from_config(with_weights(load_config(Path(model) / FILES["config"]), **weights), dtype)
        if sd is not None and is_package(sd):
            raise WeightsError(f"{sd} is a packaged model, not a Stable Diffusion: pass it as model= "
                               "(f2d-sample --model)")
        if mapping is not None and is_workdir(mapping):
            return cls.from_checkpoint(mapping, dtype=dtype, sd=DEFAULT_SD if sd is None else sd, msid=msid,
                                       expression=expression)
        sd = DEFAULT_SD if sd is None else sd
        config = f2d_config(config, config if isinstance(config, (str, os.PathLike)) else "config") \
            if config is not None else load_config(FLUX_CONFIG if is_flux(sd) else OFFICIAL_CONFIG)
        config = ml_collections.ConfigDict(config.to_dict())
        config.weights.update(sd=sd, msid=msid or "", mapping=mapping or "",
                              expression=expression or "")
        missing = [name for name in ("msid", "mapping") if not config.weights[name]]
        if missing:
            raise WeightsError(f"F2DPipeline.from_pretrained needs {' and '.join(missing)} weights (the official "
                               f"{' / '.join(m + '.pt' for m in missing)}, or a training workdir for mapping)")
        return cls.from_config(config, dtype)

    @classmethod
    def from_checkpoint(cls, workdir, step: int | None = None, dtype: str = "auto", **weights) -> F2DPipeline:
        """A training run's config and its trained parameters (latest checkpoint or `step`); `weights`
        (sd=, msid=, expression=) replace the paths its config names."""
        config, params, step = load_trained(workdir, step)
        check_f2d_run(workdir, config)
        pipe = cls.from_config(with_weights(config, **weights), dtype,
                               log=lambda msg: None if msg.startswith("mapping:") else print(msg, file=sys.stderr))
        pipe.variables = jax.device_put(with_trained(pipe.variables, params), pipe._replicated)
        pipe.checkpoint = (workdir, step)
        return pipe

    @classmethod
    def load(cls, checkpoint=None, config=None, dtype: str = "auto", model=None, **weights) -> F2DPipeline:
        """What the command lines give: a training workdir (`checkpoint`), a `config` (name or file) or a
        packaged `model` folder, whose weights paths those given replace (sd=, msid=, mapping=, expression=;
        empty ones are ignored), or weight paths alone (the paper's model sizes)."""
        weights = {k: v for k, v in weights.items() if v}
        if model:
            return cls.from_pretrained(model=model, dtype=dtype, **weights)
        if checkpoint:
            return cls.from_checkpoint(checkpoint, dtype=dtype, **weights)
        if config:
            return cls.from_config(with_weights(f2d_config(config, config), **weights), dtype=dtype)
        return cls.from_pretrained(**weights, dtype=dtype)

    def save_pretrained(self, directory, force: bool = False) -> Path:
        """Write this model as one folder (f2d_jax/convert/package.py): its config, MSID and mapping weights
        (official layouts, .safetensors), f2d_model.json naming the base Stable Diffusion, a model card.
        `from_pretrained(model=directory)` loads it. A non-empty `directory` needs `force`."""
        if self.config is None:
            raise WeightsError("save_pretrained needs the pipeline's config: build it with from_pretrained, "
                               "from_checkpoint or from_config")
        encoders = self.models.encoders
        models = {name: (getattr(encoders, name), self.variables[name]) for name in ("msid", "mapping")}
        workdir, step = self.checkpoint or (None, None)
        return save_package(directory, self.config, models, step, workdir, force)

    # ------------------------------------------------------------------ conditioning

    def identity(self, images: FaceInput | Sequence[FaceInput]) -> jax.Array:
        """(1, F) MSID features of one person, averaged over the photos given."""
        crops = np.stack([_align(image, self.detector).crop for image in _as_list(images)])
        features = self.programs.identity(self.variables, jnp.asarray(msid_input(crops)))
        return jnp.mean(features, axis=0, keepdims=True)

    def expression(self, image: FaceInput) -> jax.Array:
        """(1, 64) Deep3DFaceRecon expression code of the face in `image`."""
        if "expression" not in self.variables:
            raise WeightsError("expression_image needs the expression encoder's weights: pass expression= "
                               "(Deep3DFaceRecon's epoch_20.pth) or set weights.expression in the config")
        crop = _align(image, self.detector).expression_crop[None]
        return self.programs.expression(self.variables, jnp.asarray(expression_input(crop)))

    def encode_prompt(self, image: FaceInput | Sequence[FaceInput], prompt: str | Sequence[str],
                      expression_image: FaceInput | None = None, identity_scale: float = 1.0) -> dict[str, jax.Array]:
        """The conditioning of each prompt with the person's "f l" tokens injected: {"context":
        (len(prompts), 77, D)}, and SDXL's "text_embeds" (len(prompts), 1280).

        identity_scale: how much of the person the tokens carry. The tokens written are (1 - s) * class +
        s * tokens, class: what the encoders' input holds where "a person" stands in place of "f l"; 0 gives
        the conditioning of the prompt with "a person" for "f l", 1 the person as trained, above 1
        extrapolates (with a warning). Negative or not finite: a ValueError."""
        check_identity_scale(identity_scale)
        if identity_scale > 1:
            warnings.warn(f"identity scale {identity_scale} > 1 extrapolates beyond the person's tokens; the "
                          "images may degrade", InputWarning, stacklevel=2)
        ids, positions = self.models.sd.prompt_ids(_as_list(prompt))
        identity = self.identity(image)
        expression = self.expression(expression_image) if expression_image is not None else None
        return self.programs.condition(self.variables, identity, expression, jax.tree.map(jnp.asarray, ids),
                                       jax.tree.map(jnp.asarray, positions), self.class_ids,
                                       jnp.float32(identity_scale))

    # ------------------------------------------------------------------ generation

    def settings(self, guidance_scale=None, scheduler=None, height=None, width=None) -> tuple[float, str, int, int]:
        """The settings given, the base's defaults (`defaults`) for those left None."""
        d = self.defaults
        height = d["height"] if height is None else height
        return (d["guidance_scale"] if guidance_scale is None else guidance_scale,
                d["scheduler"] if scheduler is None else scheduler, height,
                height if width is None else width)

    def generate(self, image: FaceInput | Sequence[FaceInput], prompt: str | Sequence[str], num_images: int = 8,
                 seed: int = 0, steps: int = 30, guidance_scale: float | None = None, scheduler: str | None = None,
                 negative_prompt: str | None = None, expression_image: FaceInput | None = None, latents=None,
                 height: int | None = None, width: int | None = None, progress: bool = True,
                 batch_size: int = DEFAULT_BATCH_SIZE, identity_scale: float = 1.0,
                 true_cfg_scale: float = 1.0) -> np.ndarray:
        """(len(prompts) * num_images, height, width, 3) uint8 images, prompt-major; image j of every prompt
        uses seed + j. `latents`: (that many, channels, height / 8, width / 8) initial noise (default: from the
        seeds). `batch_size` images are made at a time; it changes neither the seeds nor the pictures. Settings
        left None are the base's defaults (a width left None is the height). Without a negative prompt the
        unconditional branch is the empty prompt's, zeros on SDXL (as diffusers' pipelines do).
        `identity_scale`: see `encode_prompt`. FLUX.1: `guidance_scale` is the transformer's guidance embedding;
        `true_cfg_scale` above 1 adds classifier-free guidance against the negative prompt (the empty prompt when
        none is given), as FluxPipeline's true_cfg_scale, at twice the work."""
        guidance_scale, scheduler, height, width = self.settings(guidance_scale, scheduler, height, width)
        check_size(height, width, self.size_multiple)
        prompts = _as_list(prompt)
        seeds = np.tile(seed_range(seed, num_images), len(prompts))
        self._check_latents(latents, len(seeds), height, width)
        conditioning = jax.tree.map(lambda x: np.repeat(np.asarray(x), num_images, axis=0),
                                    self.encode_prompt(image, prompts, expression_image, identity_scale))
        return self.sample(conditioning, seeds, steps, guidance_scale, scheduler, negative_prompt, latents, height,
                           width, progress, batch_size, true_cfg_scale)

    def sample(self, conditioning, seeds: Sequence[int], steps: int = 30, guidance_scale: float | None = None,
               scheduler: str | None = None, negative_prompt: str | None = None, latents=None,
               height: int | None = None, width: int | None = None, progress: bool = True,
               batch_size: int = DEFAULT_BATCH_SIZE, true_cfg_scale: float = 1.0) -> np.ndarray:
        """(N, height, width, 3) uint8 images from N conditionings (`encode_prompt`'s dict, or its (N, 77, D)
        context alone for SD 1.x and 2.x) and N seeds (each in 0..2^32 - 1), `batch_size` at a time.

        Image i depends only on its conditioning and seeds[i] (initial noise and the ancestral samplers'
        noise), not on what else is in the batch, nor on the batch size."""
        guidance_scale, scheduler, height, width = self.settings(guidance_scale, scheduler, height, width)
        check_size(height, width, self.size_multiple)
        check_sampling(steps, guidance_scale, scheduler, batch_size)
        seeds = as_seeds(seeds)
        n = len(seeds)
        sd = self.models.sd
        if not isinstance(conditioning, dict):
            conditioning = {"context": conditioning}
        conditioning = jax.tree.map(np.asarray, conditioning)
        expected = set(sd.conditioning_keys)
        if set(conditioning) != expected:
            raise ValueError(f"this {sd.base.upper()} model's conditioning has {sorted(expected)}, got "
                             f"{sorted(conditioning)}")
        if conditioning["context"].shape[0] != n:
            raise ValueError(f"{conditioning['context'].shape[0]} conditionings but {n} seeds: give one seed per image")
        shape = self._check_latents(latents, n, height, width)
        schedule = schedule_for(sd, scheduler, steps, height, width)
        if sd.base == "flux":
            check_true_cfg(true_cfg_scale, negative_prompt)
            uncond = None if true_cfg_scale == 1 else self.programs.embed(self.variables,
                                                                          sd.plain_ids([negative_prompt or ""]))
            guidance = jnp.asarray([guidance_scale, true_cfg_scale], jnp.float32)
        else:
            if true_cfg_scale != 1:
                raise ValueError(f"true_cfg_scale={true_cfg_scale:g} is FLUX.1's; a Stable Diffusion base's "
                                 "classifier-free guidance is the guidance scale")
            guidance = jnp.float32(guidance_scale)
            negative = self.programs.embed(self.variables, sd.plain_ids([negative_prompt or ""]))
            uncond = sd.negative_conditioning(negative, negative_prompt)
        uncond = sd.with_size(jax.tree.map(lambda x: np.broadcast_to(x, (n, *x.shape[1:])), uncond), height, width)
        conditioning = sd.with_size(conditioning, height, width)
        latents = None if latents is None else np.asarray(latents, np.float32)
        # Every batch has `size` rows, a multiple of the local devices: the last one is padded (with the
        # first images, dropped after), so the programs compile once.
        size = -(-min(batch_size, n) // self.mesh.size) * self.mesh.size
        starts = range(0, n, size)
        images, denoiser = [], self.variables[sd.denoiser]
        # Steps per program call: all of them without a progress bar; with one, about a tenth, so that
        # the bar moves ten times while the calls' fixed costs (each re-reads the UNet's weights) stay small.
        chunk = -(-steps // 10) if progress else steps
        with tqdm(total=len(starts) * steps, desc=f"sampling {n} image{'s' * (n > 1)}", unit="step",
                  disable=not progress, leave=False, dynamic_ncols=True) as bar:

            def finished(state, count: int) -> None:  # steps are done when their result is ready
                if progress:
                    jax.block_until_ready(state)
                    bar.update(count)

            for first in starts:
                rows = np.arange(first, first + size) % n
                keys = jax.vmap(jax.random.key)(jnp.asarray(seeds[rows]))
                noise = (latents[rows] if latents is not None else
                         jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(keys))
                noise_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, 1)  # the ancestral samplers' noise
                rows_of = partial(jax.tree.map, lambda x: np.asarray(x)[rows])
                batch = jax.device_put([noise, rows_of(conditioning), rows_of(uncond), noise_keys], self._batch)
                contexts, noise_keys, state = self.programs.start(schedule, *batch)
                for i in range(0, steps, chunk):
                    done, state = state, self.programs.generate(denoiser, schedule, contexts, guidance, noise_keys, i,
                                                                min(i + chunk, steps), *state)
                    if i:
                        finished(done, chunk)  # the previous chunk, while this one waits its turn
                out, finite = jax.device_get(self.programs.decode(self.variables["vae"], state[0]))
                finished(state, steps - (steps - 1) // chunk * chunk)
                _check_finite(np.asarray(finite)[:n - first], first, seeds, guidance_scale)
                images.append(np.asarray(out)[:n - first])
        return np.concatenate(images)

    def _check_latents(self, latents, n: int, height: int, width: int) -> tuple[int, ...]:
        factor = self.models.sd.vae_scale_factor
        shape = (n, self.models.sd.latent_channels, height // factor, width // factor)
        if latents is not None and tuple(np.shape(latents)) != shape:
            raise ValueError(f"latents must have shape {shape} (images, channels, height / {factor}, "
                             f"width / {factor}), got {tuple(np.shape(latents))}")
        return shape

    def __call__(self, image, prompt, num_images: int = 8, seed: int = 0, steps: int = 30,
                 guidance_scale: float | None = None, scheduler: str | None = None, negative_prompt: str | None = None,
                 expression_image=None, latents=None, height: int | None = None, width: int | None = None,
                 progress: bool = True, batch_size: int = DEFAULT_BATCH_SIZE,
                 identity_scale: float = 1.0, true_cfg_scale: float = 1.0) -> list[Image.Image]:
        """PIL images (see `generate`)."""
        images = self.generate(image, prompt, num_images, seed, steps, guidance_scale, scheduler, negative_prompt,
                               expression_image, latents, height, width, progress, batch_size, identity_scale,
                               true_cfg_scale)
        return [Image.fromarray(x) for x in images]


__all__ = ["DEFAULT_BATCH_SIZE", "DEFAULT_SD", "F2DPipeline", "MAX_SEED", "NonFiniteImagesError", "WeightsError",
           "as_seeds", "check_identity_scale", "check_sampling", "check_size", "check_true_cfg", "seed_range",
           "with_weights"]
