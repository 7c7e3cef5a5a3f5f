"""The named configs: `--config NAME` (or a path to any config file) on every command line.

    f2d_sd14      Face2Diffusion as in the paper (SD v1.4, the official sizes)
    f2d_sd15      the same on SD v1.5
    f2d_sd21      on SD 2.1 (768 px, v-prediction; 2.1-base by overriding weights.sd and the resolution)
    f2d_sdxl      on SDXL 1.0 base (two text encoders, 1024 px)
    tiny          tiny random-init models and synthetic data, for CPU tests and the offline demo
    tiny_sd2      the same on the SD 2 structure
    tiny_sdxl     the same on the SDXL structure
    msid_arcface  MSID pretraining at paper scale (ArcFace on MS1MV3)
    msid_tiny     MSID pretraining on CPU with synthetic identities

A copy of one of these files loads from anywhere: variants import their base from this package.
"""
