"""The named configs: `--config NAME` (or a path to any config file) on every command line.

    f2d_sd14      Face2Diffusion as in the paper (SD v1.4, the official sizes)
    tiny          tiny random-init models and synthetic data, for CPU tests and the offline demo
    msid_arcface  MSID pretraining at paper scale (ArcFace on MS1MV3)
    msid_tiny     MSID pretraining on CPU with synthetic identities

A copy of one of these files loads from anywhere: variants import their base from this package.
"""
