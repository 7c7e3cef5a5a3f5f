"""`report`: several score reports -> one JSON, a markdown table, the identity/text trade-off plot and
contact sheets (per prompt: a row per face, its reference crop then the generated images). A report of
an identity-scale sweep is a row per scale in the table and a curve through its scales in the plot."""
from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from f2d_jax.eval.manifest import DEFAULT_IDENTITY_SCALE
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
            raise ValueError(f"{path} is not a score report (`f2d-eval score` writes them)")
        reports.append(report)
    return reports


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def scale_points(report: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """(identity scale, its summary) for each scale of a report, ascending; a report scored without
    per-scale figures: its overall summary, at scale 1."""
    per_scale = report.get("per_scale") or {DEFAULT_IDENTITY_SCALE: report["overall"]}
    return sorted(((float(scale), summary) for scale, summary in per_scale.items()), key=lambda point: point[0])


def markdown_table(reports: Sequence[dict[str, Any]]) -> str:
    """One row per system and identity scale: identity per recognizer (failures as 0), no-face rate, CLIP score,
    means, diversity."""
    names = list(dict.fromkeys(n for r in reports for n in r["recognizers"]))
    head = ["system", "identity scale", "images", *(f"identity ({n})" for n in names), "no face", "CLIP score",
            "hmean", "gmean", "diversity"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in reports:
        for scale, o in scale_points(r):
            identity = [_fmt(o["identity"][n]["mean"]) if n in o["identity"] else "-" for n in names]
            lines.append("| " + " | ".join([r.get("system", "?"), f"{scale:g}", str(o["images"]), *identity,
                                             f"{o['no_face_rate']:.1%}", _fmt(o["clip_score"]), _fmt(o["hmean"]),
                                             _fmt(o["gmean"]), _fmt(o["diversity"])]) + " |")
    primary = sorted({r["primary"] for r in reports if r["primary"]})
    notes = (f"\nhmean / gmean: harmonic / geometric mean of the CLIP score and identity ({', '.join(primary)}); "
             "identity counts images without a detectable face as 0. CLIP: "
             f"{', '.join(sorted({r['clip_model'] for r in reports}))}.\n")
    return "\n".join(lines) + "\n" + notes


def tradeoff_points(report: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(label, identity (primary recognizer), CLIP score) per identity scale of a report; the label is the
    system's name, with the scale for a sweep."""
    points, system = scale_points(report), report.get("system", "?")
    return [(system if len(points) == 1 else f"{system} s={scale:g}",
             o["identity"][report["primary"]]["mean"] if report["primary"] else 0.0, o["clip_score"])
            for scale, o in points]


def scatter_plot(reports: Sequence[dict[str, Any]], path) -> None:
    """Identity (primary recognizer) vs CLIP score, one labelled point per report and identity scale, a
    sweep's points joined in the order of their scales: its trade-off curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=120)
    for r in reports:
        labels, identity, text = zip(*tradeoff_points(r))
        ax.plot(identity, text, marker="o", markersize=6)
        for label, x, y in zip(labels, identity, text):
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
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
