"""Evaluation: recognizers on real photos, the CLIP score against transformers' PyTorch CLIP, scoring any
folder with a manifest (no-face images are failures), and the generate -> score -> report chain."""
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from f2d_jax.eval import ClipScorer, ManifestError, ScoreError, load_prompts, neutral_prompt, score_images
from f2d_jax.eval.__main__ import main
from f2d_jax.eval.manifest import Entry, append_entries, read_manifest
from f2d_jax.eval.report import tradeoff_points
from f2d_jax.eval.recognizers import DlibRecognizer, cosine, msid_recognizer
from f2d_jax.eval.score import hmean, gmean, landmark_spread
from f2d_jax.faces import align_face, load_image
from f2d_jax.sampling import F2DPipeline
from f2d_jax.text import PromptError

FACES = Path(__file__).parent / "data" / "faces"
OBAMA = [FACES / f for f in ("obama.jpg", "obama2.jpg", "obama3.jpg")]
BIDEN = FACES / "biden.jpg"
TINY_MSID = dict(width=32, depth=4, num_heads=2, tap_layers=(0, 1, 2, 3))


@pytest.fixture(scope="module")
def clip():
    return ClipScorer.tiny()


@pytest.fixture
def blank(tmp_path):
    path = tmp_path / "wall.png"
    Image.new("RGB", (256, 256), (90, 120, 150)).save(path)
    return path


def _embed(recognizer, path):
    return recognizer([align_face(str(path))], [load_image(str(path))[0]])[0]


def test_dlib_descriptor_scores_the_same_person_above_another():
    dlib = DlibRecognizer()
    obama = [_embed(dlib, p) for p in OBAMA]
    biden = _embed(dlib, BIDEN)
    same = [float(cosine(obama[i], obama[j])) for i in range(3) for j in range(i + 1, 3)]
    different = [float(cosine(o, biden)) for o in obama]
    assert min(same) > max(different), (same, different)
    # and by dlib's own measure: distance under its 0.6 threshold for the same person only
    assert max(np.linalg.norm(obama[i] - obama[j]) for i in range(3) for j in range(i + 1, 3)) < 0.6
    assert min(np.linalg.norm(o - biden) for o in obama) > 0.6


@pytest.mark.parametrize("attention", ["cpu", "xla"])
@pytest.mark.slow
def test_clip_score_matches_transformers_pytorch_clip(tmp_path, parity, attention):
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from f2d_jax.text import load_tokenizer

    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = CLIPConfig(text_config=dict(small, vocab_size=49408), projection_dim=24,
                        vision_config=dict(small, image_size=64, patch_size=16))
    model = CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    load_tokenizer().save_pretrained(tmp_path)
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    images = [load_image(str(p))[0] for p in (*OBAMA, BIDEN)]  # portrait and landscape sizes
    images.append(np.asarray(Image.open(OBAMA[0]).convert("RGB").resize((300, 180))))
    texts = [neutral_prompt(p) for p in ("a photo of f l", "f l looking shocked", "Fauvism painting of f l",
                                          "f l in front of Niagara Falls", "f l")]
    ours = ClipScorer.load(str(tmp_path), attention=attention).scores(images, texts)
    tokens = load_tokenizer()(texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=processor(images, return_tensors="pt")["pixel_values"], **tokens)
    theirs = (out.image_embeds * out.text_embeds).sum(-1).numpy()
    assert np.ptp(theirs) > 1e-2  # the pairs score differently
    parity(f"CLIP score vs transformers PyTorch CLIP (tiny, 5 image-text pairs, {attention} attention)",
           np.abs(ours - theirs).max(), 1e-4)


def test_prompts_default_list_and_checks(tmp_path):
    prompts = load_prompts()
    assert len(prompts) == 40 and all("f l" in p for p in prompts)
    assert {"f l looking shocked", "f l exploring Machu Picchu", "Fauvism painting of f l laughing a lot",
            "f l eating bread in front of the Eiffel Tower"} <= set(prompts)
    assert neutral_prompt("A photo of f l eating ice cream") == "A photo of a person eating ice cream"
    assert neutral_prompt("f l's half") == "a person's half"
    bad = tmp_path / "p.txt"
    bad.write_text("# comment\na photo of f l\na photo of a dog\n")
    with pytest.raises(PromptError, match="prompt 2 has no identifier 'f l': 'a photo of a dog'"):
        load_prompts(bad)
    bad.write_text("a photo of f l\na photo of f l\n")
    with pytest.raises(PromptError, match="duplicate prompts"):
        load_prompts(bad)


def test_means_and_landmark_spread():
    assert hmean(0.5, 0.25) == pytest.approx(1 / 3) and gmean(0.5, 0.125) == pytest.approx(0.25)
    assert hmean(-0.2, 0.3) == 0.0 and gmean(-0.2, 0.3) == 0.0
    face = align_face(str(OBAMA[0])).landmarks
    assert landmark_spread([face, face * 2 + 10]) == pytest.approx(0.0, abs=1e-9)  # scale and shift removed
    assert landmark_spread([face]) is None
    mouth_open = face.copy()
    mouth_open[48:68, 1] += 10
    assert landmark_spread([face, mouth_open]) > 0.05


@pytest.mark.slow
def test_scores_another_systems_folder_and_counts_faceless_images_as_failures(tmp_path, blank, clip):
    """Images of the same person score above another person's; an image without a face is a failure."""
    folder = tmp_path / "other"
    (folder / "out").mkdir(parents=True)
    rows = [(OBAMA[1], "f l looking shocked", 0), (OBAMA[2], "f l looking shocked", 1),
            (BIDEN, "a photo of f l", 0), (blank, "a photo of f l", 1)]
    for i, (src, _, _) in enumerate(rows):
        shutil.copy(src, folder / "out" / f"{i}{src.suffix}")
    append_entries(folder, [Entry(str(folder / "out" / f"{i}{src.suffix}"), str(OBAMA[0]), prompt, seed)
                            for i, (src, prompt, seed) in enumerate(rows)])
    settings, entries = read_manifest(folder)
    assert settings == {} and entries[0].face_id == "obama" and entries[0].image == str(folder / "out" / "0.jpg")
    recognizers = {"dlib": DlibRecognizer(), "msid": msid_recognizer(TINY_MSID, log=lambda m: None)}
    report = score_images(entries, clip, recognizers, progress=False)
    found = [r["face_found"] for r in report["images"]]
    assert found == [True, True, True, False]
    dlib = [r["identity"]["dlib"] for r in report["images"]]
    assert min(dlib[:2]) > dlib[2] and dlib[3] is None
    overall = report["overall"]
    assert overall["no_face_rate"] == 0.25 and overall["images"] == 4 and overall["faces"] == 1
    assert overall["identity"]["dlib"]["mean"] == pytest.approx(sum(dlib[:3]) / 4)
    assert overall["identity"]["dlib"]["detected_mean"] == pytest.approx(sum(dlib[:3]) / 3)
    assert overall["clip_score"] == pytest.approx(np.mean([r["clip_score"] for r in report["images"]]))
    assert overall["hmean"] == pytest.approx(hmean(overall["identity"]["dlib"]["mean"], overall["clip_score"]))
    assert report["primary"] == "dlib" and set(report["per_prompt"]) == {"f l looking shocked", "a photo of f l"}
    assert report["per_prompt"]["a photo of f l"]["no_face_rate"] == 0.5
    assert report["per_prompt"]["f l looking shocked"]["diversity"] > 0  # two detected faces over two seeds
    assert report["per_prompt"]["a photo of f l"]["diversity"] is None  # one face: no pair


@pytest.mark.slow
def test_a_reference_without_a_face_is_a_clear_error(blank, clip):
    with pytest.raises(ScoreError, match="no face found in the reference photo .*wall.png"):
        score_images([Entry(str(OBAMA[1]), str(blank), "a photo of f l")], clip, {}, progress=False)


@pytest.mark.slow
def test_generate_score_report_chain_on_the_tiny_config(tmp_path, blank, capsys):
    faces = tmp_path / "faces"
    faces.mkdir()
    for path in (OBAMA[0], BIDEN):
        shutil.copy(path, faces)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of f l\nf l looking shocked\n")
    gen, common = tmp_path / "gen", ["--steps", "2", "--batch-size", "3"]
    args = ["generate", "--config", "configs/tiny.py", "--faces", str(faces), "--prompts", str(prompts),
            "--seeds", "2", "--out", str(gen), *common]  # run from the checkout
    assert main(args) == 0
    settings, entries = read_manifest(gen)
    assert len(entries) == 8 and settings["system"] == "tiny" and settings["height"] == 64
    assert {e.key() for e in entries} == {(f, p, s, 1.0) for f in ("obama", "biden")
                                          for p in ("a photo of f l", "f l looking shocked") for s in (0, 1)}
    assert all(e.image.endswith("_scale1.0.png") for e in entries) and settings["identity_scales"] == [1.0]
    first = np.asarray(Image.open(entries[3].image))
    # A folder made before the identity scales (no scale in its settings and manifest) holds scale 1.
    rows = [json.loads(line) for line in (gen / "manifest.jsonl").read_text().splitlines()]
    (gen / "manifest.jsonl").write_text("".join(json.dumps({k: v for k, v in row.items() if k != "identity_scale"})
                                                + "\n" for row in rows))
    (gen / "settings.json").write_text(json.dumps({k: v for k, v in settings.items() if k != "identity_scales"}))
    # Resuming: nothing is redone; a lost image is made again, the same picture (up to batch rounding).
    Path(entries[3].image).unlink()
    capsys.readouterr()
    assert main(args) == 0
    assert "1 images generated, 7 already there" in capsys.readouterr().err
    again = np.asarray(Image.open(entries[3].image))
    assert np.abs(again.astype(int) - first).max() <= 1
    assert main([*args[:-4], "--steps", "3", "--batch-size", "3"]) == 2
    assert "holds images generated with other settings (steps: 2 -> 3)" in capsys.readouterr().err
    # Another generator is refused too, before any weights load: another config (of the same system name),
    # the named config, other weights.
    tiny, other = str(Path("configs/tiny.py").resolve()), tmp_path / "variant" / "tiny.py"
    other.parent.mkdir()
    other.write_text("from f2d_jax.configs import tiny\n\n\ndef get_config():\n    config = tiny.get_config()\n"
                     "    config.seed = 1\n    return config\n")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(F2DPipeline, "from_config", classmethod(lambda *a, **k: pytest.fail("weights loaded")))
        for change, message in [(["--config", str(other)], f"config: {tiny!r} -> {str(other)!r}"),
                                (["--config", "tiny"], f"config: {tiny!r} -> 'tiny'"),
                                (["--msid", "msid.pt"], "weights.msid: '' -> 'msid.pt')")]:
            flags = dict(zip(args[1::2], args[2::2])) | dict(zip(change[::2], change[1::2]))
            assert main(["generate", *[x for item in flags.items() for x in item]]) == 2
            err = capsys.readouterr().err
            assert "holds images generated with other settings (" + message in err, err
    assert json.loads((gen / "settings.json").read_text())["config"] == tiny
    # A sweep adds the scales the folder lacks (scale 1 is there), each image named and listed with its scale.
    assert main([*args, "--identity-scale", "0,1"]) == 0
    assert "8 images generated, 8 already there" in capsys.readouterr().err
    settings, entries = read_manifest(gen)
    assert settings["identity_scales"] == [0.0, 1.0] and len(entries) == 16
    person = {e.key()[:3]: e.image for e in entries if e.identity_scale == 1.0}
    classes = [e for e in entries if e.identity_scale == 0.0]
    assert {e.key()[:3] for e in classes} == set(person) and all(e.image.endswith("_scale0.0.png") for e in classes)
    assert not np.array_equal(*(np.asarray(Image.open(f)) for f in (classes[0].image, person[classes[0].key()[:3]])))

    assert main(["score", "--generated", str(gen), "--out", str(tmp_path / "tiny.json"), "--clip", "tiny"]) == 0
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert report["system"] == "tiny" and report["overall"]["images"] == 16
    assert report["recognizers"] == ["dlib", "msid"] and len(report["per_face"]) == 2
    assert {k: v["images"] for k, v in report["per_scale"].items()} == {"0.0": 8, "1.0": 8}
    # random tiny models make no faces: all failures, scored as 0, not a crash
    assert report["overall"]["no_face_rate"] == 1.0 and report["overall"]["identity"]["dlib"]["mean"] == 0.0
    assert tradeoff_points(report) == [(f"tiny s={s}", 0.0, report["per_scale"][f"{s}.0"]["clip_score"])
                                       for s in (0, 1)]
    # A report scored before the sweeps (no per-scale figures) is one point, at scale 1.
    other = {k: v for k, v in report.items() if k != "per_scale"} | {"system": "tiny again"}
    (tmp_path / "again.json").write_text(json.dumps(other))
    out = tmp_path / "report"
    assert main(["report", "--inputs", str(tmp_path / "tiny.json"), str(tmp_path / "again.json"),
                 "--out", str(out)]) == 0
    table = (out / "report.md").read_text()
    assert "| tiny | 0 | 8 |" in table and "| tiny | 1 | 8 |" in table and "| tiny again | 1 | 16 |" in table
    assert "identity (dlib)" in table and "| system | identity scale | images |" in table
    assert Image.open(out / "tradeoff.png").size[0] > 300
    sheets = sorted((out / "sheets" / "tiny").glob("*.png"))
    assert len(sheets) == 2 and Image.open(sheets[0]).size == (5 * 128, 24 + 2 * 128)
    assert [r["system"] for r in json.loads((out / "report.json").read_text())] == ["tiny", "tiny again"]


@pytest.mark.slow
def test_generate_from_a_workdir_records_its_checkpoint_step_and_refuses_another(tmp_path, capsys):
    from f2d_jax.config import load_config
    from f2d_jax.train.launch import run

    workdir, gen, faces, prompts = tmp_path / "run", tmp_path / "gen", tmp_path / "faces", tmp_path / "prompts.txt"
    assert run(load_config("tiny", ["train.steps=2", "checkpoint.every=1", "log.sample_every=0"]), workdir) == 0
    faces.mkdir()
    shutil.copy(OBAMA[0], faces)
    prompts.write_text("a photo of f l\n")
    args = ["generate", "--config", str(workdir), "--faces", str(faces), "--prompts", str(prompts), "--seeds", "1",
            "--steps", "1", "--out", str(gen)]
    assert main(args) == 0
    settings = read_manifest(gen)[0]
    assert settings["config"] == str(workdir.resolve()) and settings["checkpoint"] and settings["step"] == 2
    shutil.rmtree(workdir / "checkpoints" / "2")  # the latest checkpoint set aside: step 1 is the latest now
    capsys.readouterr()
    assert main(args) == 2
    assert "holds images generated with other settings (step: 2 -> 1)" in capsys.readouterr().err


def test_ctrl_c_in_generate_is_one_line_and_keeps_the_finished_images(tmp_path, capsys, monkeypatch):
    calls = []

    def sample(context, seeds, **kwargs):
        calls.append(seeds)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return np.zeros((len(seeds), 64, 64, 3), np.uint8)

    def encode_prompt(face, prompts, identity_scale):
        return {"context": np.zeros((len(prompts), 77, 32))}

    pipe = SimpleNamespace(encode_prompt=encode_prompt, sample=sample,
                           settings=lambda guidance, scheduler: (7.0, "euler_a", 64, 64))
    monkeypatch.setattr(F2DPipeline, "from_config", classmethod(lambda *a, **k: pipe))
    faces = tmp_path / "faces"
    faces.mkdir()
    shutil.copy(OBAMA[0], faces)
    args = ["generate", "--config", "tiny", "--faces", str(faces), "--batch-size", "2", "--out", str(tmp_path / "g")]
    assert main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "interrupted: the images finished so far are kept; rerun the same command to resume")
    assert len(read_manifest(tmp_path / "g")[1]) == 2


def test_a_weights_mismatch_shows_its_key_list(tmp_path, capsys):
    import jax

    from f2d_jax.config import load_config
    from f2d_jax.convert import save_mapping
    from f2d_jax.encoders import Encoders

    wrong = tmp_path / "mapping.safetensors"  # given as MSID weights
    save_mapping(Encoders.from_config(load_config("tiny").model).init(jax.random.key(0), ("mapping",))["mapping"],
                 wrong)
    faces = tmp_path / "faces"
    faces.mkdir()
    shutil.copy(OBAMA[0], faces)
    assert main(["generate", "--config", "tiny", "--faces", str(faces), "--msid", str(wrong), "--out",
                 str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    first = next(i for i, line in enumerate(err) if line.startswith("error: "))
    assert err[first] == f"error: msid weights {wrong} does not match the model:" and "missing keys: " in err[first + 1]


@pytest.mark.parametrize("command, message", [
    (["score", "--generated", "{tmp}", "--out", "{tmp}/r.json"], "has no manifest.jsonl"),
    (["score", "--generated", "{other}", "--out", "{tmp}/r.json", "--clip", "tiny"],
     "the msid recognizer needs --msid"),
    (["score", "--generated", "{other}", "--out", "{tmp}/r.json", "--recognizers", "dlib,facenet"],
     "unknown recognizer\\(s\\) facenet"),
    (["score", "--generated", "{other}", "--out", "{tmp}/r.txt"], "--out must be a .json file"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{faces}", "--out", "{tmp}/g"],
     "no face found in .*wall.png"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{tmp}/none", "--out", "{tmp}/g"], "is not a directory"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{faces}", "--prompts", "{tmp}/p.txt", "--out",
      "{tmp}/g"], "prompt 1 has no identifier"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{faces}", "--seeds", "0", "--out", "{tmp}/g"],
     "--seeds must be at least 1"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{obama}", "--steps", "0", "--out", "{tmp}/g"],
     "steps must be between 1 and 1000, got 0"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{obama}", "--scheduler", "heun", "--out", "{tmp}/g"],
     "unknown scheduler 'heun': choose one of euler_a, euler, ddim, dpm\\+\\+2m"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{obama}", "--guidance", "nan", "--out", "{tmp}/g"],
     "the guidance scale must be a finite number, got nan"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{obama}", "--batch-size", "0", "--out", "{tmp}/g"],
     "the batch size must be at least 1, got 0"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{obama}", "--out", "{tmp}/p.txt/g"],
     "--out .*/p.txt/g cannot be written: .*/p.txt is a file, not a directory"),
    (["generate", "--config", "{tmp}/nothing", "--faces", "{obama}", "--out", "{tmp}/g"],
     "no config file at .*/nothing, and no named config"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{obama}", "--identity-scale", "0.5,-1", "--out",
      "{tmp}/g"], "the identity scale must be a finite number of at least 0 .*, got -1.0"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{obama}", "--identity-scale", "0.5,x", "--out",
      "{tmp}/g"], "--identity-scale takes numbers separated by commas \\(such as 0.6,0.8,1.0\\), got '0.5,x'"),
    (["generate", "--config", "configs/tiny.py", "--faces", "{obama}", "--identity-scale", "1,0.5,1.0", "--out",
      "{tmp}/g"], "--identity-scale names a scale twice: 1,0.5,1.0"),
    (["score", "--generated", "{typed}", "--out", "{tmp}/r.json"], "manifest.jsonl line 2: seed='3' \\(a whole "
     "number or null\\); identity_scale=-1 \\(a finite number of at least 0\\)$"),
    (["score", "--generated", "{other}", "--out", "/proc/r.json"],
     "--out /proc/r.json cannot be written: /proc is not writable$"),
    (["report", "--inputs", "{tmp}/p.txt", "--out", "{tmp}/p.txt"],
     "--out .*/p.txt cannot be written: .*/p.txt is a file, not a directory$"),
    (["report", "--inputs", "{tmp}/p.txt", "--out", "{tmp}/r"], "is not JSON"),
    (["report", "--inputs", "{tmp}/plain.json", "--out", "{tmp}/r"], "is not a score report"),
])
def test_bad_input_is_one_error_line(tmp_path, blank, capsys, monkeypatch, command, message):
    """Each mistake is one line and status 2; generate's are found before any weights load."""
    for load in ("from_config", "from_checkpoint"):
        monkeypatch.setattr(F2DPipeline, load, classmethod(lambda *a, **k: pytest.fail("weights loaded")))
    faces, other, obama = tmp_path / "faces", tmp_path / "other", tmp_path / "obama"
    faces.mkdir()
    obama.mkdir()
    shutil.copy(OBAMA[0], faces)
    shutil.copy(OBAMA[0], obama)
    shutil.copy(blank, faces)
    other.mkdir()
    append_entries(other, [Entry(str(OBAMA[1]), str(OBAMA[0]), "a photo of f l")])
    typed = tmp_path / "typed"  # a manifest with values of the wrong types
    typed.mkdir()
    lines = [dict(image="a.png", face="b.jpg", prompt="f l"),
             dict(image="a.png", face="b.jpg", prompt="f l", seed="3", identity_scale=-1)]
    (typed / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (tmp_path / "p.txt").write_text("a photo of a dog\n")
    (tmp_path / "plain.json").write_text("[1, 2]")
    args = [a.format(tmp=tmp_path, faces=faces, other=other, obama=obama, typed=typed) for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and sum(line.startswith("error") for line in err) == 1, err
    assert re.search(message, err[-1]), err[-1]


def test_manifest_lines_need_image_face_and_prompt(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"image": "a.png", "prompt": "f l"}\n')
    with pytest.raises(ManifestError, match="line 1 lacks face"):
        read_manifest(tmp_path)
