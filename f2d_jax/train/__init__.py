"""Face2Diffusion training: state, the jitted CGDR step, checkpoints, metrics and the loop."""
