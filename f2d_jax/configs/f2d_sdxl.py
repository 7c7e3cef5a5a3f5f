"""Face2Diffusion on SDXL 1.0 base (1024 px): two text encoders, CLIP ViT-L (768 wide) and OpenCLIP
bigG (1280 wide). The mapping network's output is 768 + 1280 wide: the first 768 of each "f l"
token go into CLIP-L, the other 1280 into bigG (f2d_jax.encoders). The 2.6B-parameter UNet is frozen:
shard it over the mesh's fsdp axis on small accelerators (--config.mesh.fsdp=8
--config.mesh.frozen=fsdp).

Run with --config f2d_sdxl (or --config configs/f2d_sdxl.py in a checkout)."""
from f2d_jax.configs import f2d_sd14


def get_config():
    config = f2d_sd14.get_config()
    config.weights.sd = "stabilityai/stable-diffusion-xl-base-1.0"  # local diffusers directory or hub id
    config.model.mapping.token_dim = 768 + 1280                     # CLIP ViT-L's and bigG's widths
    config.data.resolution = 1024
    return config
