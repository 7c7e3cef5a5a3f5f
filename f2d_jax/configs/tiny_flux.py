"""The tiny config on the FLUX.1 structure (a transformer of 2 double and 2 single blocks, the 16-channel VAE,
a 32-wide CLIP and a 32-wide T5 with the tiny T5 tokenizer): random-init, for CPU tests and demos. The
mapping network writes 32 + 32 wide tokens.

Run with --config tiny_flux (or --config configs/tiny_flux.py in a checkout)."""
import ml_collections

from f2d_jax.configs import tiny


def get_config():
    config = tiny.get_config()
    config.model.tiny_base = "flux"
    config.model.mapping.token_dim = 32 + 32
    config.flux = ml_collections.ConfigDict(dict(max_sequence_length=32, train_guidance=1.0))
    config.log.update(sample_guidance=3.5)
    return config
