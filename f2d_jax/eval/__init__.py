"""Evaluation: identity fidelity vs text fidelity, as the paper measures it (`python -m f2d_jax.eval`).

generate.py (faces x prompts x seeds, resumable) -> manifest.py (the folder format any system can write)
-> score.py (recognizers.py, clip_score.py) -> report.py (JSON, markdown, scatter plot, contact sheets).
"""
from f2d_jax.eval.clip_score import ClipScorer
from f2d_jax.eval.manifest import Entry, ManifestError, read_manifest
from f2d_jax.eval.prompts import load_prompts, neutral_prompt
from f2d_jax.eval.score import ScoreError, score_images

__all__ = ["ClipScorer", "Entry", "ManifestError", "ScoreError", "load_prompts", "neutral_prompt", "read_manifest",
           "score_images"]
