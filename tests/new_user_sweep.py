"""A new user's sweep of the console scripts: about a hundred mistakes, a few good runs and interrupts, each
run as its own process, with the verdict the project promises for it.

    python tests/new_user_sweep.py                      # the console scripts beside this Python
    python tests/new_user_sweep.py --bin venv/bin --json sweep.json

Mistakes must end with exit status 2 and exactly one `error:` line on stderr (argparse's usage line may
come before it), no traceback; good runs with 0; Ctrl-C with 130 and one `interrupted` line; SIGTERM
during training with 143. It works in a temporary folder (run it from anywhere: it needs no checkout)
and prints one line per probe, then the counts. Not part of the test suite: it takes about ten minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Probe:
    name: str
    argv: list[str]      # the console script's name, then its arguments
    expect: int = 2      # exit status: 2 a mistake, 0 a good run, 130 Ctrl-C, 143 SIGTERM
    signal_after: float | None = None  # seconds after the start to send SIGINT (130) or SIGTERM (143)
    wait_for: str | None = None  # or: a path whose appearance triggers the signal


def _verdict(probe: Probe, status: int, err: str) -> tuple[bool, str]:
    lines = [line for line in err.splitlines() if line.strip()]
    if "Traceback" in err or "Exception ignored" in err:
        return False, "traceback"
    if status != probe.expect:
        return False, f"exit {status}, wanted {probe.expect}: {lines[-1] if lines else ''}"[:200]
    if probe.expect == 2:
        errors = [line for line in lines if line.startswith("error:") or ": error: " in line]
        if len(errors) != 1:
            return False, f"{len(errors)} error lines"
        return True, errors[0][:160]
    if probe.expect == 130:
        ok = [line for line in lines if line.startswith("interrupted")] == lines[-1:]
        return ok, lines[-1][:160] if lines else ""
    if probe.expect == 143:
        return "SIGTERM: saved checkpoint" in err, lines[-1][:160] if lines else ""
    return True, lines[-1][:160] if lines else ""


def run_probe(probe: Probe, bin_dir: Path, cwd: Path) -> tuple[int, str]:
    command = [str(bin_dir / probe.argv[0]), *probe.argv[1:]]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if probe.signal_after is None and probe.wait_for is None:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
        return result.returncode, result.stderr
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    if probe.wait_for:
        while not (cwd / probe.wait_for).exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
    else:
        time.sleep(probe.signal_after)
    proc.send_signal(signal.SIGTERM if probe.expect == 143 else signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def materials(bin_dir: Path, root: Path) -> dict[str, str]:
    """The files the probes use, made in `root`: a trained tiny run, its package, photos, broken weights."""
    import numpy as np
    from PIL import Image

    face = root / "face.jpg"
    shutil.copy(Path(__import__("f2d_jax").__file__).parent / "assets" / "face.jpg", face)
    faces = root / "faces"
    faces.mkdir()
    shutil.copy(face, faces / "face.jpg")
    wall_dir = root / "walls"
    wall_dir.mkdir()
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(wall_dir / "wall.png")
    Image.new("RGB", (20000, 20000), (120, 120, 120)).save(root / "huge.png")
    (root / "random.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "notes.txt").write_text("a file")
    (root / "syntax.py").write_text("def get_config(:\n")
    (root / "undefined.py").write_text("from f2d_jax.configs import tiny\n\n\ndef get_config():\n"
                                       "    config = tiny.get_config()\n    config.seed = undefined\n    return config\n")
    (root / "no_get_config.py").write_text("x = 1\n")
    (root / "prompts.txt").write_text("a photo of f l\n")
    (root / "no_identifier.txt").write_text("a photo of a dog\n")
    (root / "bad.json").write_text("[1, 2]")
    (root / "empty").mkdir()
    typed = root / "typed"
    typed.mkdir()
    (typed / "manifest.jsonl").write_text(json.dumps(dict(image="a.png", face=str(face), prompt="f l", seed="3"))
                                          + "\n")
    listed = root / "listed"  # a manifest of one image (the photo itself)
    listed.mkdir()
    (listed / "manifest.jsonl").write_text(json.dumps(dict(image=str(face), face=str(face), prompt="a photo of f l"))
                                           + "\n")
    nonempty = root / "nonempty"
    nonempty.mkdir()
    (nonempty / "keep.txt").write_text("mine")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    subprocess.run([str(bin_dir / "f2d-train"), "--config", "tiny", "--workdir", str(root / "run"),
                    "--config.train.steps=4", "--config.checkpoint.every=2", "--config.log.sample_every=0"],
                   cwd=root, env=env, check=True, capture_output=True)
    subprocess.run([str(bin_dir / "f2d-convert"), "export", str(root / "run"), "--out", str(root / "export")],
                   cwd=root, env=env, check=True, capture_output=True)
    subprocess.run([str(bin_dir / "f2d-convert"), "package", str(root / "run"), "--out", str(root / "model")],
                   cwd=root, env=env, check=True, capture_output=True)
    code = ("import sys, numpy as np\nfrom f2d_jax.convert import io\nstate = io.read_state_dict(sys.argv[1])\n"
            "next(v for v in state.values() if v.ndim == 2)[0, 0] = np.nan\nio.write_state_dict(state, sys.argv[2])\n")
    subprocess.run([sys.executable, "-c", code, str(root / "export" / "mapping.pt"), str(root / "nan.pt")],
                   cwd=root, env=env, check=True)
    return dict(face=str(face), faces=str(faces), walls=str(wall_dir), wall=str(wall_dir / "wall.png"),
                huge=str(root / "huge.png"), random=str(root / "random.pt"), nan=str(root / "nan.pt"),
                file=str(root / "notes.txt"), run=str(root / "run"), model=str(root / "model"),
                mapping=str(root / "export" / "mapping.pt"), empty=str(root / "empty"), typed=str(typed),
                nonempty=str(nonempty), listed=str(listed), prompts=str(root / "prompts.txt"), root=str(root),
                non_utf8=os.fsdecode(os.fsencode(str(root)) + b"/run\xff"))


def probes(m: dict[str, str]) -> list[Probe]:
    train = ["f2d-train", "--config", "tiny", "--config.log.sample_every=0"]
    sample = ["f2d-sample", "--image", m["face"], "--prompt", "a photo of f l", "-n", "1", "--steps", "2"]
    tiny_sample = [*sample, "--config", "tiny"]
    generate = ["f2d-eval", "generate", "--config", "tiny", "--faces", m["faces"], "--prompts", m["prompts"],
                "--seeds", "1", "--steps", "2"]
    p = [Probe(f"train --config.{o}", [*train, "--workdir", "w", f"--config.{o}"]) for o in [
        "train.steps=abc", "train.nosuch=1", "nosuch=1", "train.steps.x=1", "data.resolution=60", "data.resolution=0",
        "data.resolution=72", "train.trainable=[", "train.compute_dtype=bogus", "seed=18446744073709551616", "seed=-1",
        "optim.lr=-1", "optim.lr=nan", "train.p_uncond=2", "optim.b1=1.0", "checkpoint.keep=0", "log.sample_steps=0",
        "mesh.data=0", "optim.schedule=linear", "train.steps=0", "train.batch_size=0", "data.workers=-1",
        "model.mapping.dropout=1.0", "weights.msid=/nonexistent.pt", f"weights.msid={m['random']}",
        f"weights.mapping={m['nan']}", "weights.sd=./no/such/sd"]]
    p += [
        Probe("train --config.train.steps (no value)", [*train, "--workdir", "w", "--config.train.steps"]),
        Probe("train --config missing", ["f2d-train", "--config", "nosuch", "--workdir", "w"]),
        Probe("train config with a syntax error", ["f2d-train", "--config", "syntax.py", "--workdir", "w"]),
        Probe("train config with an undefined name", ["f2d-train", "--config", "undefined.py", "--workdir", "w"]),
        Probe("train config without get_config", ["f2d-train", "--config", "no_get_config.py", "--workdir", "w"]),
        Probe("train --workdir a file", [*train, "--workdir", m["file"]]),
        Probe("train --workdir read-only", [*train, "--workdir", "/proc/f2d-run"]),
        Probe("train --workdir not UTF-8", [*train, "--workdir", m["non_utf8"]]),
        Probe("train msid_tiny --config.arcface.scale=0", ["f2d-train", "--config", "msid_tiny", "--workdir", "w",
                                                           "--config.arcface.scale=0"]),
        Probe("train --bogus", [*train, "--workdir", "w", "--bogus"]),
        Probe("sample no weights", sample + ["--out", "o.png"]),
        Probe("sample --image missing", ["f2d-sample", "--config", "tiny", "--image", "missing.jpg", "--prompt",
                                         "a photo of f l", "--out", "o.png"]),
        Probe("sample --image without a face", ["f2d-sample", "--config", "tiny", "--image", m["wall"], "--prompt",
                                                "a photo of f l", "--out", "o.png"]),
        Probe("sample --image 400 megapixels", ["f2d-sample", "--config", "tiny", "--image", m["huge"], "--prompt",
                                                "a photo of f l", "--out", "o.png"]),
        Probe("sample --image not an image", ["f2d-sample", "--config", "tiny", "--image", m["file"], "--prompt",
                                              "a photo of f l", "--out", "o.png"]),
        Probe("sample --prompt without f l", ["f2d-sample", "--config", "tiny", "--image", m["face"], "--prompt",
                                              "a photo", "--out", "o.png"]),
        Probe("sample --config msid_tiny", ["f2d-sample", "--config", "msid_tiny", "--image", m["face"], "--prompt",
                                            "a photo of f l", "--out", "o.png"]),
        Probe("sample --checkpoint and --config", [*tiny_sample, "--checkpoint", m["run"], "--out", "o.png"]),
        Probe("sample --checkpoint missing", [*sample, "--checkpoint", "nosuch", "--out", "o.png"]),
        Probe("sample --checkpoint empty folder", [*sample, "--checkpoint", m["empty"], "--out", "o.png"]),
        Probe("sample --model missing", [*sample, "--model", "nosuch", "--out", "o.png"]),
        Probe("sample --model a run", [*sample, "--model", m["run"], "--out", "o.png"]),
        Probe("sample --mapping with NaN", [*tiny_sample, "--mapping", m["nan"], "--out", "o.png"]),
        Probe("sample --mapping random bytes", [*tiny_sample, "--mapping", m["random"], "--out", "o.png"]),
        Probe("sample --msid missing", [*tiny_sample, "--msid", "missing.pt", "--out", "o.png"]),
        Probe("sample --expression-image without weights", [*tiny_sample, "--expression-image", m["face"], "--out",
                                                            "o.png"]),
        Probe("sample --guidance 1e38 (NaN images)", [*tiny_sample, "--guidance", "1e38", "--out", "o.png"]),
        Probe("sample --out read-only", [*tiny_sample, "--out", "/proc/o.png"]),
        Probe("sample --out-dir read-only", [*tiny_sample, "--out", "o.png", "--out-dir", "/proc/d"]),
        Probe("sample --out not PNG", [*tiny_sample, "--out", "o.jpg"]),
        Probe("sample --out a folder", [*tiny_sample, "--out", m["empty"]]),
    ]
    p += [Probe(f"sample {' '.join(extra)}", [*tiny_sample, "--out", "o.png", *extra]) for extra in [
        ["--height", "0"], ["--height", "8"], ["--width", "24"], ["--height", "-64"], ["--steps", "0"],
        ["--steps", "5000"], ["--guidance", "nan"], ["--scheduler", "heun"], ["-n", "0"], ["--seed", "-1"],
        ["--seed", str(2 ** 40)], ["--batch-size", "0"], ["--identity-scale", "-1"], ["--identity-scale", "nan"],
        ["--dtype", "float8"], ["--steps", "x"]]]
    p += [
        Probe("convert import nothing", ["f2d-convert", "import", "--out", "wd"]),
        Probe("convert import --mapping missing", ["f2d-convert", "import", "--mapping", "missing.pt", "--out", "wd"]),
        Probe("convert import --mapping random bytes", ["f2d-convert", "import", "--mapping", m["random"], "--out",
                                                        "wd"]),
        Probe("convert import --mapping with NaN", ["f2d-convert", "import", "--mapping", m["nan"], "--config",
                                                    "tiny", "--out", "wd"]),
        Probe("convert import --mapping of other sizes", ["f2d-convert", "import", "--mapping", m["mapping"],
                                                          "--out", "wd"]),
        Probe("convert import --out read-only", ["f2d-convert", "import", "--mapping", m["mapping"], "--config", "tiny",
                                                 "--out", "/proc/wd"]),
        Probe("convert import --out a file", ["f2d-convert", "import", "--mapping", m["mapping"], "--config", "tiny",
                                              "--out", m["file"]]),
        Probe("convert export missing", ["f2d-convert", "export", "nosuch", "--out", "e"]),
        Probe("convert export --out read-only", ["f2d-convert", "export", m["run"], "--out", "/proc/e"]),
        Probe("convert package --step 999", ["f2d-convert", "package", m["run"], "--out", "p", "--step", "999"]),
        Probe("convert package --out read-only", ["f2d-convert", "package", m["run"], "--out", "/proc/p"]),
        Probe("convert package --out not empty", ["f2d-convert", "package", m["run"], "--out", m["nonempty"]]),
        Probe("convert package not a run", ["f2d-convert", "package", m["empty"], "--out", "p"]),
        Probe("convert package --push-to-hub bad id", ["f2d-convert", "package", m["run"], "--out", "p",
                                                       "--push-to-hub", "not/a/repo"]),
        Probe("convert inspect missing", ["f2d-convert", "inspect", "missing.pt"]),
        Probe("convert inspect random bytes", ["f2d-convert", "inspect", m["random"]]),
        Probe("convert inspect a photo", ["f2d-convert", "inspect", m["face"]]),
        Probe("convert (no command)", ["f2d-convert"]),
        Probe("eval generate --faces missing", ["f2d-eval", "generate", "--config", "tiny", "--faces", "nosuch",
                                                "--out", "g"]),
        Probe("eval generate faces without a face", ["f2d-eval", "generate", "--config", "tiny", "--faces",
                                                     m["walls"], "--out", "g"]),
        Probe("eval generate --seeds 0", [*generate, "--seeds", "0", "--out", "g"]),
        Probe("eval generate --height 0", [*generate, "--height", "0", "--out", "g"]),
        Probe("eval generate --height 8", [*generate, "--height", "8", "--out", "g"]),
        Probe("eval generate --identity-scale x", [*generate, "--identity-scale", "x", "--out", "g"]),
        Probe("eval generate --out read-only", [*generate, "--out", "/proc/g"]),
        Probe("eval generate --config msid_tiny", ["f2d-eval", "generate", "--config", "msid_tiny", "--faces",
                                                   m["faces"], "--out", "g"]),
        Probe("eval generate --prompts without f l", ["f2d-eval", "generate", "--config", "tiny", "--faces",
                                                      m["faces"], "--prompts", "no_identifier.txt", "--out", "g"]),
        Probe("eval score no manifest", ["f2d-eval", "score", "--generated", m["empty"], "--out", "s.json"]),
        Probe("eval score wrong value types", ["f2d-eval", "score", "--generated", m["typed"], "--out", "s.json"]),
        Probe("eval score --out not JSON", ["f2d-eval", "score", "--generated", m["listed"], "--out", "s.txt"]),
        Probe("eval score --out read-only", ["f2d-eval", "score", "--generated", m["listed"], "--out",
                                             "/proc/s.json"]),
        Probe("eval report --inputs not a report", ["f2d-eval", "report", "--inputs", "bad.json", "--out", "r"]),
        Probe("eval report --out a file", ["f2d-eval", "report", "--inputs", "bad.json", "--out", m["file"]]),
        Probe("demo --config msid_tiny", ["f2d-demo", "--config", "msid_tiny"]),
        Probe("demo --image without a face", ["f2d-demo", "--image", m["wall"]]),
        Probe("demo --prompt without f l", ["f2d-demo", "--prompt", "a photo"]),
        Probe("demo --config missing", ["f2d-demo", "--config", "nosuch"]),
        Probe("prepare --images missing", ["f2d-prepare", "--images", "nosuch", "--out", "d"]),
        Probe("prepare --config msid_tiny", ["f2d-prepare", "--config", "msid_tiny", "--images", m["faces"], "--out",
                                             "d"]),
        Probe("identities --source missing", ["f2d-identities", "--source", "nosuch", "--out", "i"]),
        Probe("identities --source not identities", ["f2d-identities", "--source", m["faces"], "--out", "i"]),
        Probe("verify --msid missing", ["f2d-verify", "--msid", "missing.pt", "lfw.bin"]),
        Probe("verify --folds 0", ["f2d-verify", "--msid", m["run"], "--folds", "0", "lfw.bin"]),
        Probe("app --port -1", ["f2d-app", "--port", "-1"]),
        Probe("app --port 70000", ["f2d-app", "--port", "70000"]),
        Probe("app --config missing", ["f2d-app", "--config", "nosuch"]),
        Probe("app --config msid_tiny", ["f2d-app", "--config", "msid_tiny"]),
        Probe("app --model missing", ["f2d-app", "--model", "nosuch"]),
        Probe("app --model and --config", ["f2d-app", "--model", m["model"], "--config", "tiny"]),
        # good runs
        Probe("train tiny (good)", [*train, "--workdir", "good", "--config.train.steps=2"], expect=0),
        Probe("sample --checkpoint (good)", [*sample, "--checkpoint", m["run"], "--out", "good.png"], expect=0),
        Probe("sample --model (good)", [*sample, "--model", m["model"], "--out", "good2.png"], expect=0),
        Probe("convert inspect a run (good)", ["f2d-convert", "inspect", m["run"]], expect=0),
        Probe("convert inspect a package (good)", ["f2d-convert", "inspect", m["model"]], expect=0),
        Probe("eval generate (good)", [*generate, "--out", "good_gen"], expect=0),
        Probe("demo (good)", ["f2d-demo"], expect=0),
        # interrupts
        *[Probe(f"train Ctrl-C after {t} s", [*train, "--workdir", f"int{t}", "--config.train.steps=100000"],
                expect=130, signal_after=t) for t in (0.3, 1, 2, 3, 5, 8)],
        Probe("sample Ctrl-C after 1 s", [*tiny_sample, "--steps", "1000", "--out", "int.png"], expect=130,
              signal_after=1.0),
        Probe("eval generate Ctrl-C after 1 s", [*generate, "--steps", "1000", "--out", "int_gen"], expect=130,
              signal_after=1.0),
        Probe("train SIGTERM on a checkpoint step", [*train, "--workdir", "term", "--config.train.steps=100000",
                                                     "--config.checkpoint.every=1"], expect=143,
              wait_for="term/checkpoints/2"),
    ]
    return p


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin", default=str(Path(sys.executable).parent), help="the folder of the console scripts "
                        "(default: this Python's)")
    parser.add_argument("--json", help="also write every probe's outcome here")
    args = parser.parse_args(argv)
    bin_dir = Path(args.bin).absolute()
    with tempfile.TemporaryDirectory(prefix="f2d-sweep-") as folder:
        root = Path(folder)
        m = materials(bin_dir, root)
        rows = []
        for probe in probes(m):
            started = time.monotonic()
            status, err = run_probe(probe, bin_dir, root)
            ok, note = _verdict(probe, status, err)
            rows.append(dict(probe=probe.name, expect=probe.expect, status=status, ok=ok, note=note,
                             seconds=round(time.monotonic() - started, 1)))
            print(f"{'ok  ' if ok else 'FAIL'} {probe.name:<48s} exit {status:<4d} {note}", flush=True)
    mistakes = [r for r in rows if r["expect"] == 2]
    print(f"\n{len(rows)} probes: {sum(r['ok'] for r in rows)} as promised, {sum(not r['ok'] for r in rows)} not; "
          f"{len(mistakes)} mistakes, {sum(r['ok'] for r in mistakes)} of them one `error:` line and exit 2")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
