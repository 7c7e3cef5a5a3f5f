"""The web app: face photo(s) and a prompt with "f l" -> images in the browser, built with gradio.

`build(pipe, args, limits)` makes the page. Its generate function is also the API endpoint "generate"
(gradio_client: `Client(url).predict(..., api_name="/generate")`). One generation runs at a time, the
others wait in the queue; a user's mistake (no face, no "f l", settings over the limits) is a message
in the page, and the server goes on. Gradio writes the pictures, as PNGs with the settings in their
metadata, into its folder (GRADIO_TEMP_DIR, which f2d_jax.cli.app makes and removes).
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from f2d_jax import InputWarning, usage
from f2d_jax.faces import AlignedFace, align_face
from f2d_jax.sampling import SCHEDULERS, F2DPipeline, seed_range
from f2d_jax.sampling.metadata import png_text, weights_source

MAX_IMAGES = 8
MAX_STEPS = 150
MAX_IDENTITY_SCALE = 1.5
MAX_PIXELS = 25_000_000  # a photo's decoded size, checked before it is decoded
MAX_FILE_SIZE = "20mb"  # an upload's size, checked by gradio as it arrives
PROMPT_HINT = 'write "f l" where the person goes, e.g. "a photo of f l on the moon"'
EXAMPLE_PROMPT = "a photo of f l"
EXAMPLE_FACE = str(resources.files("f2d_jax").joinpath("assets/face.jpg"))
CSS = "#crops .gallery-item {max-width: 140px}"  # the crops at about their size, however few


@dataclass(frozen=True)
class Settings:
    """A request's sampling settings, as the page and the API give them."""
    num_images: int
    seed: int
    steps: int
    guidance: float
    scheduler: str
    height: int
    width: int
    identity_scale: float


@dataclass(frozen=True)
class Limits:
    """What the page offers and what a request may ask for (with MAX_IMAGES, MAX_STEPS and
    MAX_IDENTITY_SCALE)."""
    defaults: Settings
    max_size: int  # height and width: multiples of `size_multiple` up to this
    size_multiple: int


def limits_for(pipe: F2DPipeline, size: int | None = None) -> Limits:
    """The page's defaults (the base's sampler and guidance; `size`, else the base's size) and limits
    (sizes up to twice the default)."""
    guidance, scheduler, height, width = pipe.settings(height=size)
    defaults = Settings(num_images=4, seed=0, steps=30, guidance=guidance, scheduler=scheduler, height=height,
                        width=width, identity_scale=1.0)
    return Limits(defaults, max_size=2 * max(height, width), size_multiple=pipe.size_multiple)


def _whole(name: str, value) -> int:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and float(value).is_integer()):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(value)


def checked_settings(limits: Limits, num_images, seed, steps, guidance, scheduler, height, width,
                     identity_scale) -> Settings:
    """The request's settings as a Settings, or a ValueError naming the first mistake. The ranges of the
    sliders and the sampler's choices are the page's components' to enforce (gradio checks them on the
    server, API calls too); this checks what they do not: whole numbers, sizes in multiples of the
    model's, the seeds' range."""
    settings = Settings(num_images=_whole("the number of images", num_images), seed=_whole("the seed", seed),
                        steps=_whole("steps", steps), guidance=float(guidance), scheduler=scheduler,
                        height=_whole("height", height), width=_whole("width", width),
                        identity_scale=float(identity_scale))
    for name in ("height", "width"):
        if getattr(settings, name) % limits.size_multiple:
            raise ValueError(f"{name} must be a multiple of {limits.size_multiple}, got {getattr(settings, name)}")
    seed_range(settings.seed, settings.num_images)
    return settings


def check_photo(path: str) -> None:
    """A ValueError unless `path` is an image of at most MAX_PIXELS pixels (read from its header: a
    larger one is never decoded)."""
    name = Path(path).name
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"cannot read {name} as an image ({type(e).__name__})") from None
    if width * height > MAX_PIXELS:
        raise ValueError(f"{name} is {width}x{height} pixels: photos may have up to {MAX_PIXELS / 1e6:g} megapixels")


def aligned_faces(photos: list[str], expression_photo: str | None) -> tuple[list[AlignedFace], AlignedFace | None]:
    """The faces of the photos (a ValueError for a photo too large or without a face)."""
    for path in [*photos, *([expression_photo] if expression_photo else [])]:
        check_photo(path)
    return [align_face(path) for path in photos], align_face(expression_photo) if expression_photo else None


def public_message(error: BaseException, paths: list[str]) -> str:
    """The message of an error or warning, with the server's paths of the uploads cut to their file names."""
    message = usage.describe(error)
    for path in paths:
        message = message.replace(path, Path(path).name)
    return message


def with_text(image: np.ndarray, text: dict[str, str]) -> Image.Image:
    """A PIL image carrying PNG text chunks: gradio writes them into the PNG it serves."""
    image = Image.fromarray(image)
    image.info.update(text)
    return image


def generate_images(pipe: F2DPipeline, args: argparse.Namespace, limits: Limits, photos: list[str],
                    expression_photo: str | None, prompt: str, negative_prompt: str | None, *sampling,
                    progress: bool = True) -> tuple[list[tuple[Image.Image, str]], list[tuple[np.ndarray, str]]]:
    """One request: the gallery's (image, caption) pairs and the aligned crops used with their
    photos' names. `sampling`: checked_settings' arguments after `limits`."""
    if not photos:
        raise ValueError("upload at least one photo of the person's face")
    if expression_photo and "expression" not in pipe.variables:
        raise ValueError("an expression photo needs the expression encoder's weights: start the app with "
                         "--expression (Deep3DFaceRecon's epoch_20.pth)")
    settings = checked_settings(limits, *sampling)
    pipe.models.sd.prompt_ids([prompt])   # a prompt without "f l" (or cut before it) is refused before the faces
    faces, expression = aligned_faces(photos, expression_photo)
    images = pipe.generate(faces, prompt, num_images=settings.num_images, seed=settings.seed, steps=settings.steps,
                           guidance_scale=settings.guidance, scheduler=settings.scheduler,
                           negative_prompt=negative_prompt, expression_image=expression, height=settings.height,
                           width=settings.width, progress=progress, identity_scale=settings.identity_scale)
    names = [Path(path).name for path in photos]
    recorded = dict(images=names, expression_image=Path(expression_photo).name if expression_photo else None,
                    steps=settings.steps, guidance=settings.guidance, scheduler=settings.scheduler,
                    identity_scale=settings.identity_scale, negative_prompt=negative_prompt,
                    height=settings.height, width=settings.width)
    source = weights_source(args, pipe)
    gallery = [(with_text(image, png_text(prompt, settings.seed + j, recorded, source)), f"seed {settings.seed + j}")
               for j, image in enumerate(images)]
    crops = [(face.crop, name) for face, name in zip(faces, names)]
    if expression is not None:
        crops.append((expression.expression_crop, f"expression: {Path(expression_photo).name}"))
    return gallery, crops


def warm_up(pipe: F2DPipeline, args: argparse.Namespace, limits: Limits) -> None:
    """Compiles the programs the page's default settings run, on the packaged portrait."""
    d = limits.defaults
    generate_images(pipe, args, limits, [EXAMPLE_FACE], None, EXAMPLE_PROMPT, None, d.num_images, d.seed,
                    d.steps, d.guidance, d.scheduler, d.height, d.width, d.identity_scale, progress=False)


def _paths(files) -> list[str]:
    """Upload paths from what gr.File gives (None, a path or a list of paths)."""
    if not files:
        return []
    return [str(f) for f in (files if isinstance(files, list) else [files])]


def build(pipe: F2DPipeline, args: argparse.Namespace, limits: Limits) -> gr.Blocks:
    """The page, with the generate function as the API endpoint "generate"."""
    d = limits.defaults
    has_expression = "expression" in pipe.variables
    flux = pipe.models.sd.base == "flux"   # no negative prompt, one sampler, the guidance embedding

    def generate(photos, expression_photo, prompt, negative_prompt, num_images, seed, steps, guidance, sampler,
                 height, width, identity_scale, progress=gr.Progress(track_tqdm=True)):
        photos, expression = _paths(photos), (_paths(expression_photo) or [None])[0]
        prompt, negative_prompt = prompt or "", negative_prompt or None  # none: as diffusers (zeros on SDXL)
        progress(0, desc="aligning the faces")
        uploads, shown = [*photos, *([expression] if expression else [])], set()

        def show(message, category, *args, **kwargs):  # in the page as it happens, once, and in the log
            message = public_message(message, uploads)
            if category is InputWarning and message not in shown:
                shown.add(message)
                print(f"warning: {message}", file=sys.stderr)
                gr.Warning(message)

        try:
            with warnings.catch_warnings():  # the prompt cut, several faces in a photo, an identity scale above 1
                warnings.simplefilter("always", InputWarning)
                warnings.showwarning = show
                return generate_images(pipe, args, limits, photos, expression, prompt, negative_prompt,
                                       num_images, seed, steps, guidance, sampler, height, width, identity_scale)
        except usage.USER_ERRORS as e:  # a message in the page and one line in the server's log
            message = public_message(e, uploads)
            print(f"request refused: {message}", file=sys.stderr)
            raise gr.Error(message, print_exception=False) from None

    with gr.Blocks(title="Face2Diffusion", delete_cache=(3600, 3600)) as page:
        gr.Markdown("# Face2Diffusion\nPictures of the person in the photos, from a prompt where **f l** stands "
                    "for the person.")
        with gr.Row():
            with gr.Column():
                photos = gr.File(label="Face photo(s) of one person (several: identity averaged)",
                                 file_count="multiple", file_types=["image"], elem_id="photos")
                with gr.Accordion("Expression photo (optional)" if has_expression else
                                  "Expression photo: needs expression weights (start the app with --expression)",
                                  open=False):
                    expression = gr.File(label="Expression photo", file_types=["image"], interactive=has_expression,
                                         elem_id="expression")
                prompt = gr.Textbox(label="Prompt", info=PROMPT_HINT, placeholder=EXAMPLE_PROMPT, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative", visible=not flux)
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Accordion("Settings", open=True):
                    num_images = gr.Slider(1, MAX_IMAGES, value=d.num_images, step=1, label="Number of images")
                    seed = gr.Number(value=d.seed, precision=0, label="Seed (image j uses seed + j)")
                    steps = gr.Slider(1, MAX_STEPS, value=d.steps, step=1, label="Steps")
                    guidance = gr.Slider(0, 20, value=d.guidance, step=0.5,
                                         label="Guidance (FLUX.1's guidance embedding)" if flux else "Guidance scale")
                    sampler = gr.Dropdown(["euler"] if flux else list(SCHEDULERS), value=d.scheduler, label="Sampler")
                    size = dict(minimum=limits.size_multiple, maximum=limits.max_size, step=limits.size_multiple)
                    height = gr.Slider(value=d.height, label="Height", **size)
                    width = gr.Slider(value=d.width, label="Width", **size)
                    identity_scale = gr.Slider(0, MAX_IDENTITY_SCALE, value=d.identity_scale, step=0.05,
                                               label="identity_scale", info="identity strength: 0 draws "
                                               "a person, 1 the person as trained, above 1 stronger")
            with gr.Column():
                gallery = gr.Gallery(label="Images (PNG, settings in the metadata)", format="png", columns=4,
                                     height="auto", elem_id="gallery")
                crops = gr.Gallery(label="Aligned faces used", format="png", allow_preview=False, elem_id="crops")
        button.click(generate, [photos, expression, prompt, negative, num_images, seed, steps, guidance, sampler,
                                height, width, identity_scale], [gallery, crops], api_name="generate",
                     concurrency_limit=1)
    return page
