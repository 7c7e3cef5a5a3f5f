"""The offline demo: a face photo + a prompt -> "f l" tokens -> Stable Diffusion text conditioning.

    f2d-demo [--config tiny] [--image face.jpg] [--prompt "a photo of f l"]

With the `tiny` config (the default) every model is a tiny random-init one (no weights, no downloads), so the
numbers mean nothing; the shapes and the path through the code are the real ones.
"""
from __future__ import annotations

import argparse
import sys
import time
from importlib import resources

import jax
import jax.numpy as jnp

from f2d_jax import usage
from f2d_jax.compile_cache import enable
from f2d_jax.config import add_config_arguments, config_from_args, f2d_config
from f2d_jax.encoders import Encoders
from f2d_jax.faces import NoFaceError, align_face, expression_input, msid_input
from f2d_jax.bundle import tiny_base
from f2d_jax.text import PromptError, identifier_prompts


@usage.command
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="f2d-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, default="tiny")
    parser.add_argument("--image", help="face photo (default: the portrait shipped with the package)")
    parser.add_argument("--prompt", default="f l eating bread in front of the Eiffel Tower",
                        help="prompt containing the identifier 'f l' (default: %(default)r)")
    usage.add_compile_cache(parser)
    try:
        args, config = config_from_args(parser, argv)
        f2d_config(config, args.config)
        input_ids, positions = identifier_prompts(args.prompt)
        face = align_face(args.image or str(resources.files("f2d_jax").joinpath("assets/face.jpg")))
    except (NoFaceError, PromptError, FileNotFoundError, ValueError) as e:
        return usage.error(str(e))
    if any(config.weights[name] for name in ("sd", "msid", "mapping", "expression")):
        print("note: the demo runs random-init models of the config's sizes; weights are not loaded",
              file=sys.stderr)

    enable(args.compile_cache)
    text_encoders = None
    if not config.weights.sd:  # the text encoders of the config's tiny random Stable Diffusion or FLUX
        base = tiny_base(config)
        text_encoders = base.text_encoders
        input_ids, positions = base.prompt_ids([args.prompt])
    try:
        encoders = Encoders.from_config(config.model, text_encoders)
    except ValueError as e:
        return usage.error(f"{e}. The demo builds the text encoder from the config alone (SD v1's, or a tiny "
                           "config's); for another base run sample.py, which reads it from the SD directory")
    variables = encoders.init(jax.random.key(config.seed))

    @jax.jit
    def condition(variables, faces, expression_images, input_ids, positions):
        identity = encoders.identity_features(variables, faces)
        expression = encoders.expression_codes(variables, expression_images)
        tokens = encoders.identity_tokens(variables, identity)                    # null expression (inference)
        tokens_with_expression = encoders.identity_tokens(variables, identity, expression)
        conditioning = encoders.prompt_embeddings(variables, input_ids, positions, tokens)
        return identity, expression, tokens, tokens_with_expression, conditioning

    start = time.perf_counter()
    outputs = jax.block_until_ready(condition(variables, jnp.asarray(msid_input(face.crop[None])),
                                              jnp.asarray(expression_input(face.expression_crop[None])),
                                              input_ids, positions))
    identity, expression, tokens, tokens_with_expression, conditioning = outputs
    print(f"face       {face.source}: landmarks {face.landmarks.shape}, crops {face.crop.shape} and "
          f"{face.expression_crop.shape}")
    print(f"MSID       identity features          {identity.shape}")
    print(f"expression Deep3DFaceRecon code       {expression.shape}")
    print(f"mapping    'f l' tokens (null exp)    {tokens.shape}")
    print(f"mapping    'f l' tokens (photo's exp) {tokens_with_expression.shape}")
    clip_ids, clip_positions = (x["text_encoder"] if isinstance(x, dict) else x for x in (input_ids, positions))
    print(f"prompt     {args.prompt!r}: ids {clip_ids.shape}, 'f' at position {int(clip_positions[0])}")
    if "pooled" in conditioning:   # FLUX.1
        print(f"T5         text embedding             {conditioning['context'].shape}  (the transformer's "
              "encoder_hidden_states)")
        print(f"CLIP       pooled embedding           {conditioning['pooled'].shape}  (its pooled_projections)")
    else:
        print(f"CLIP       text embedding             {conditioning['context'].shape}  (the UNet's "
              "encoder_hidden_states)")
    print(f"({time.perf_counter() - start:.1f} s including compilation; config {args.config})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
