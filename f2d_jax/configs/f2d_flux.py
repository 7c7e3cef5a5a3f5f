"""Face2Diffusion on FLUX.1-dev: the identity reaches T5-XXL's token sequence (the transformer's text stream)
and CLIP ViT-L's pooled vector (its modulation). The mapping network's output is 768 + 4096 wide: the first
768 of each "f l" token go into CLIP, the other 4096 into T5 (f2d_jax.encoders). Training is flow matching
with CGDR (f2d_jax/train/step.py, docs/training.md); the 12B-parameter transformer and T5 are frozen and, on
8-chip slices, sharded over the mesh's fsdp axis (--config.mesh.fsdp=8 --config.mesh.frozen=fsdp).

FLUX.1-dev's weights are non-commercial (its licence); FLUX.1-schnell's are Apache-2.0: train on it with
--config.weights.sd=black-forest-labs/FLUX.1-schnell.

Run with --config f2d_flux (or --config configs/f2d_flux.py in a checkout)."""
import ml_collections

from f2d_jax.configs import f2d_sd14


def get_config():
    config = f2d_sd14.get_config()
    config.weights.sd = "black-forest-labs/FLUX.1-dev"   # local FLUX folder or hub id
    config.model.mapping.token_dim = 768 + 4096          # CLIP ViT-L's and T5-XXL's widths
    config.data.resolution = 512                         # FLUX trains at any multiple of 16
    config.flux = ml_collections.ConfigDict(dict(
        max_sequence_length=512,   # T5 tokens per prompt (FluxPipeline's default)
        train_guidance=1.0,        # FLUX.1-dev's guidance embedding while training: 1, the undistilled velocity
    ))
    config.log.update(sample_steps=28, sample_guidance=3.5)  # FluxPipeline's defaults (guidance embedding)
    return config
