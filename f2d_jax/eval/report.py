"""`report`: several score reports -> one JSON, a markdown table, the identity/text trade-off scatter plot
and contact sheets (per prompt: a row per face, its reference crop then the generated images)."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from f2d_jax.eval.prompts import slug
from f2d_jax.faces import align_face, load_image

THUMB = 128


def load_reports(paths: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    reports = []
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except FileNotFoundError as e:
            raise FileNotFoundError(f"no report at {path}") from e
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from e
        if not isinstance(report, dict) or "overall" not in report:
            raise ValueError(f"{path} is not a score report (`python -m f2d_jax.eval score` writes them)")
        reports.append(report)
    return reports


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(reports: Sequence[dict[str, Any]]) -> str:
    """One row per system: identity per recognizer (failures as 0), no-face rate, CLIP score, means, diversity."""
    names = list(dict.fromkeys(n for r in reports for n in r["recognizers"]))
    head = ["system", "images", *(f"identity ({n})" for n in names), "no face", "CLIP score", "hmean", "gmean",
            "diversity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        o = r["overall"]
        identity = [_fmt(o["identity"][n]["mean"]) if n in o["identity"] else "-" for n in names]
        lines.append("| " + " | ".join([r.get("system", "?"), str(o["images"]), *identity, f"{o['no_face_rate']:.1%}",
                                         _fmt(o["clip_score"]), _fmt(o["hmean"]), _fmt(o["gmean"]),
                                         _fmt(o["diversity"])]) + " |")
    primary = sorted({r["primary"] for r in reports if r["primary"]})
    notes = (f"\nhmean / gmean: harmonic / geometric mean of the CLIP score and identity ({', '.join(primary)}); "
             "identity counts images without a detectable face as 0. CLIP: "
             f"{', '.join(sorted({r['clip_model'] for r in reports}))}.\n")
    return "\n".join(lines) + "\n" + notes


def scatter_plot(reports: Sequence[dict[str, Any]], path) -> None:
    """Identity (primary recognizer) vs CLIP score, one labelled point per report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for r in reports:
        o = r["overall"]
        identity = o["identity"][r["primary"]]["mean"] if r["primary"] else 0.0
        ax.scatter([identity], [o["clip_score"]], s=40)
        ax.annotate(r.get("system", "?"), (identity, o["clip_score"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
    primary = ", ".join(sorted({r["primary"] for r in reports if r["primary"]})) or "none"
    ax.set_xlabel(f"identity similarity ({primary})")
    ax.set_ylabel("CLIP score (text fidelity)")
    ax.set_title("identity vs text fidelity")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _thumb(image: np.ndarray) -> Image.Image:
    return ImageOps.fit(Image.fromarray(image).convert("RGB"), (THUMB, THUMB), Image.BICUBIC)  # centre crop


def _reference_thumb(path: str) -> Image.Image:
    try:
        return _thumb(align_face(path).crop)
    except (ValueError, FileNotFoundError):  # shown as it is when no face is found now
        return _thumb(load_image(path)[0])


def contact_sheets(report: dict[str, Any], directory, max_faces: int = 8, max_seeds: int = 8) -> list[Path]:
    """One PNG per prompt: a row per face (at most max_faces), the reference then up to max_seeds images."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    references, written = {}, []
    prompts = list(dict.fromkeys(r["prompt"] for r in report["images"]))
    for number, prompt in enumerate(prompts):
        rows = {}
        for r in report["images"]:
            if r["prompt"] == prompt and (r["face_id"] in rows or len(rows) < max_faces):
                rows.setdefault(r["face_id"], (r["face"], []))[1].append(r["image"])
        columns = 1 + min(max_seeds, max(len(images) for _, images in rows.values()))
        sheet = Image.new("RGB", (columns * THUMB, 24 + len(rows) * THUMB), "white")
        ImageDraw.Draw(sheet).text((4, 6), prompt, fill="black")
        for row, (face, images) in enumerate(rows.values()):
            if face not in references:
                references[face] = _reference_thumb(face)
            sheet.paste(references[face], (0, 24 + row * THUMB))
            for column, image in enumerate(images[:max_seeds], 1):
                sheet.paste(_thumb(load_image(image)[0]), (column * THUMB, 24 + row * THUMB))
        written.append(directory / f"{number:02d}_{slug(prompt)}.png")
        sheet.save(written[-1])
    return written


def write_report(reports: Sequence[dict[str, Any]], out, sheets: bool = True) -> dict[str, Path]:
    """report.json (the reports without per-image rows), report.md, tradeoff.png and sheets/<system>/."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    systems = [r.get("system", "?") for r in reports]
    if len(set(systems)) < len(systems):
        raise ValueError(f"two reports name the same system ({', '.join(systems)}); rename one with score --name")
    paths = {"json": out / "report.json", "markdown": out / "report.md", "scatter": out / "tradeoff.png"}
    summary = [{k: v for k, v in r.items() if k != "images"} for r in reports]
    paths["json"].write_text(json.dumps(summary, indent=2) + "\n")
    paths["markdown"].write_text("# Face2Diffusion evaluation\n\n" + markdown_table(reports))
    scatter_plot(reports, paths["scatter"])
    if sheets:
        for report, system in zip(reports, systems):
            contact_sheets(report, out / "sheets" / re.sub(r"[^A-Za-z0-9._-]+", "_", system))
        paths["sheets"] = out / "sheets"
    return paths
