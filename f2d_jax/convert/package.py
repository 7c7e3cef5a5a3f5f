"""One folder per trained model: what `F2DPipeline.save_pretrained` and `f2d-convert package` write, and
what `F2DPipeline.from_pretrained(model=DIR)`, `f2d-sample --model DIR` and `f2d_jax.torch` read.

    DIR/f2d_model.json       format and version; the base Stable Diffusion (hub id or path), where MSID came
                             from, the expression weights to use (not included), the checkpoint's step
    DIR/config.json          the run's config, as its checkpoints store it (`load_config` reads it)
    DIR/msid.safetensors     MSID, always included (trained or not), in the official msid.pt layout
    DIR/mapping.safetensors  the trained mapping network, in the official mapping.pt layout
    DIR/README.md            model card: training settings, step, data, evaluation figures

f2d_model.json is written last, so a folder without one is incomplete. Reading a folder needs no JAX
(the PyTorch side reads it too); writing one imports JAX when called.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from f2d_jax.convert.io import read_manifest

MODEL_FILE = "f2d_model.json"
FORMAT = "f2d-jax model"
VERSION = 1
FILES = {"config": "config.json", "msid": "msid.safetensors", "mapping": "mapping.safetensors"}


def is_package(path) -> bool:
    """Whether `path` is a packaged model's folder (it has f2d_model.json)."""
    return (Path(os.fspath(path)) / MODEL_FILE).is_file()


def read_package(directory) -> dict[str, Any]:
    """The f2d_model.json of a packaged model; a ValueError for a folder that is not one."""
    path = Path(os.fspath(directory)) / MODEL_FILE
    manifest = read_manifest(path, FORMAT, f"{directory} is not a packaged model (no {MODEL_FILE}); write one with "
                             "`f2d-convert package WORKDIR --out DIR` or F2DPipeline.save_pretrained(DIR)")
    if manifest.get("version") != VERSION:
        raise ValueError(f"{path} is format version {manifest.get('version')}; this f2d-jax reads version {VERSION}: "
                         "upgrade f2d-jax")
    return manifest


def package_weights(directory) -> dict[str, str]:
    """The weights paths of a packaged model, as a config's `weights` section names them: sd (the base),
    msid and mapping (its files), expression (the expression weights its manifest names, "" for none)."""
    manifest = read_package(directory)
    directory = Path(os.fspath(directory))
    return dict(sd=manifest["base"], msid=str(directory / FILES["msid"]), mapping=str(directory / FILES["mapping"]),
                expression=manifest["expression"])


def package_config(directory) -> dict[str, Any]:
    """The config of a packaged model as a dict (`load_config(DIR/config.json)` gives the ConfigDict)."""
    read_package(directory)
    return json.loads((Path(os.fspath(directory)) / FILES["config"]).read_text())


# ----------------------------------------------------------------------------- writing


def check_out(directory, force: bool) -> None:
    """An error unless `directory` can receive a package: absent, empty, or non-empty with `force`."""
    directory = Path(os.fspath(directory))
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a folder to write a model in")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise FileExistsError(f"{directory} is not empty; choose another folder, or pass --force (force=True) to "
                              "write the model into it, replacing its files of the same names")


def save_package(directory, config, models: Mapping[str, tuple[Any, Any]], step: int | None = None,
                 workdir=None, force: bool = False) -> Path:
    """Write a packaged model: `config` (ConfigDict or dict), `models` {"msid", "mapping": (Flax module,
    variables)}, the checkpoint's `step` and the run's `workdir` (for the model card) when known."""
    from f2d_jax.convert.checkpoints import save

    assert set(models) == {"msid", "mapping"}, sorted(models)
    directory = Path(os.fspath(directory))
    check_out(directory, force)
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MODEL_FILE).unlink(missing_ok=True)  # incomplete until the manifest is written again
    for name, (module, variables) in models.items():
        save(name, variables, directory / FILES[name], module)
    (directory / FILES["config"]).write_text(json.dumps(config, indent=2) + "\n")
    weights = config["weights"]
    manifest = {"format": FORMAT, "version": VERSION, "base": weights["sd"], "msid_source": weights["msid"],
                "expression": weights["expression"], "step": step,
                "workdir": str(Path(workdir).resolve()) if workdir else None, "files": FILES}
    (directory / "README.md").write_text(model_card(config, manifest, workdir))
    (directory / MODEL_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    return directory


def trained_models(workdir, step: int | None = None, msid=None,
                   log=lambda msg: None) -> tuple[Any, dict[str, tuple], int]:
    """(config, {"msid", "mapping": (Flax module, variables)}, step) of a Face2Diffusion run's checkpoint
    (default: the latest): MSID from `msid` or as its config names it (random init where empty), with what
    the run trained."""
    from f2d_jax.config import config_from_dict
    from f2d_jax.encoders import face_models
    from f2d_jax.bundle import encoder_variables
    from f2d_jax.params import with_trained
    from f2d_jax.workdir import check_f2d_run, load_trained

    config, params, step = load_trained(workdir, step)
    check_f2d_run(workdir, config)
    others = sorted(params.keys() - FILES.keys())
    if others:
        raise ValueError(f"{workdir} trained {', '.join(others)} too: a packaged model holds only MSID and the "
                         "mapping network")
    config = config_from_dict(config)
    if msid:
        config.weights.msid = str(msid)
    models = {name: face_models(config.model)[name] for name in ("msid", "mapping")}  # no text encoder: any base
    variables = with_trained(encoder_variables(config, models, log=log), params)
    return config, {name: (model, variables[name]) for name, model in models.items()}, step


def package_workdir(workdir, directory, step: int | None = None, force: bool = False, msid=None) -> Path:
    """`f2d-convert package`: a run's checkpoint (default: the latest) as a packaged model in `directory`;
    `msid`: MSID weights in place of those the run's config names (a path on the machine that trained it)."""
    check_out(directory, force)  # before any weights load
    config, models, step = trained_models(workdir, step, msid)
    return save_package(directory, config, models, step, workdir, force)


# ----------------------------------------------------------------------------- the model card


def model_card(config: Mapping[str, Any], manifest: Mapping[str, Any], workdir=None) -> str:
    """README.md of a packaged model: its base, training settings, step, data and evaluation figures."""
    train, optim = config["train"], config["optim"]
    base = manifest["base"] or f"the tiny random-init Stable Diffusion ({config['model'].get('tiny_base', 'sd1')} " \
                               "structure, drawn from the config's seed)"
    step = manifest["step"]
    rows = [("base model (Stable Diffusion)", base),
            ("MSID", f"from {manifest['msid_source']}" if manifest["msid_source"] else "random init (config seed)"),
            ("checkpoint step", f"{step} of train.steps={train['steps']}" if step is not None else "not recorded"),
            ("learning rate", f"{optim['lr']} ({optim['schedule']}, {optim['warmup_steps']} warm-up steps)"),
            ("batch size", train["batch_size"]),
            ("CGDR lambda (background term)", train["cgdr_lambda"]),
            ("trained parameters", f"`{train['trainable']}`"),
            ("resolution", config["data"]["resolution"]),
            ("data", data_size(config["data"]))]
    loss = _final_loss(workdir, step) if workdir else None
    if loss is not None:
        rows.append(("training loss at the last logged step", f"{loss['loss']:.4f} (step {loss['step']})"))
    reports = score_reports(workdir) if workdir else []
    if reports:
        from f2d_jax.eval.report import markdown_table

        evaluation = f"Score reports found in the run's folder ({len(reports)}):\n\n{markdown_table(reports)}"
    else:
        evaluation = "None: the run's folder holds no score report (`f2d-eval score` writes them)."
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    run = f" from `{manifest['workdir']}`" if manifest["workdir"] else ""
    return f"""# Face2Diffusion model

A Face2Diffusion identity encoder trained with f2d-jax{run}: MSID features of a face photo become the
"f l" tokens of a prompt for the base Stable Diffusion named below.

## Training

| setting | value |
|---|---|
{table}

The whole config is `config.json`.

## Evaluation

{evaluation}

## Files

- `f2d_model.json`: the base model, where MSID came from, the expression weights to use (not included)
- `config.json`: the run's config
- `msid.safetensors`, `mapping.safetensors`: MSID and the mapping network in the official PyTorch layouts

## Use

```bash
f2d-sample --model DIR --image face.jpg --prompt "a photo of f l" --out out.png
```

```python
from f2d_jax.sampling import F2DPipeline
pipe = F2DPipeline.from_pretrained(model="DIR")     # sd="..." replaces the base's path

from f2d_jax.torch import Face2DiffusionEncoder
f2d = Face2DiffusionEncoder.from_pretrained(model="DIR")
```
"""


def data_size(data: Mapping[str, Any]) -> str:
    """What a run's config says about its training data, with the prepared dataset's size where it is here."""
    if not data["dir"]:
        return f"synthetic: {data['synthetic_examples']} examples of {data['synthetic_identities']} identities"
    from f2d_jax.data.read import read_info

    try:
        splits = read_info(data["dir"])["splits"]
    except (OSError, ValueError, KeyError):
        return f"prepared dataset {data['dir']} (not readable here: its size is unknown)"
    return f"prepared dataset {data['dir']}: " + ", ".join(f"{count} {split}" for split, count in splits.items()) \
        + " examples"


def _final_loss(workdir, step: int | None) -> dict | None:
    """The last metrics.jsonl line with a loss, at or before `step`."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    logged = [m for m in lines if "loss" in m and (step is None or m["step"] <= step)]
    return logged[-1] if logged else None


def score_reports(workdir) -> list[dict[str, Any]]:
    """The score reports (`f2d_jax.eval score` JSON) anywhere in the run's folder but its checkpoints."""
    workdir = Path(workdir)
    reports = []
    for path in sorted(workdir.rglob("*.json")):
        if "checkpoints" in path.relative_to(workdir).parts:
            continue
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(report, dict) and "overall" in report:
            reports.append(report)
    return reports
