"""The web app (python -m f2d_jax.app): a server on the tiny config (one per test worker), on a free
localhost port in a subprocess, driven by gradio's Python client and by a headless chromium; a user's
mistakes are messages in the page and the next request works; the command line's mistakes are one
`error:` line.

The browser test needs Debian's chromium (apt-get install chromium); without it the test skips,
unless F2D_REQUIRE_BROWSER is set (as in CI), which makes its absence a failure.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gradio_client
import httpx
import numpy as np
import pytest
from PIL import Image

from f2d_jax.cli import app as app_cli

ROOT = Path(__file__).resolve().parent.parent
FACE = str(ROOT / "f2d_jax/assets/face.jpg")
FACES = [str(ROOT / "tests/data/faces/obama.jpg"), str(ROOT / "tests/data/faces/biden.jpg")]
# The browser test's screenshot lands in its tmp_path; F2D_SCREENSHOT=docs/app.png refreshes the docs' copy.
SCREENSHOT = os.environ.get("F2D_SCREENSHOT")
# The page's defaults on the tiny config (the programs the server compiled at start-up): images,
# seed, steps, guidance, sampler, height, width, identity scale.
DEFAULTS = [4, 0, 30, 7.0, "euler_a", 64, 64, 1.0]
NO_FACE = "no face found in wall.png; use a photo with a clear, roughly frontal face"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The running app: its url, port and folder. Stopping it (SIGTERM, as Ctrl-C) removes the folder."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "f2d_jax.app", "--config", "tiny", "--port", str(port)],
                                   cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 400
    while "running on http://127.0.0.1" not in log_path.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.5)
    folder = Path(re.search(r"files in (\S+)", log_path.read_text()).group(1))
    assert folder.is_dir()
    assert f"running on http://127.0.0.1:{port}/ (this machine only: --host 0.0.0.0 or --share to reach it from " \
           "others); Ctrl-C stops the server\n" in log_path.read_text()
    assert "share=True" not in log_path.read_text()  # gradio's advice for launch(), not for this command line
    yield type("Server", (), dict(url=f"http://127.0.0.1:{port}", port=port, folder=folder, process=process,
                                  log=log_path))
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 130, log_path.read_text()
    assert log_path.read_text().endswith("interrupted: the server stopped\n") and not folder.exists()


@pytest.fixture(scope="module")
def client(server):
    client = gradio_client.Client(server.url, verbose=False, download_files=True)
    yield client
    client.close()  # its heartbeat connection would hold the server's shutdown


@pytest.fixture(scope="module")
def wall(tmp_path_factory) -> str:
    """A flat grey photo: no face."""
    path = tmp_path_factory.mktemp("photos") / "wall.png"
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(path)
    return str(path)


def generate(client, photos, prompt, *settings, expression=None, negative=""):
    settings = settings or DEFAULTS
    return client.predict([gradio_client.handle_file(p) for p in photos],
                          gradio_client.handle_file(expression) if expression else None, prompt, negative, *settings,
                          api_name="/generate")


def app_error(client, *args, **kwargs) -> str:
    with pytest.raises(gradio_client.exceptions.AppError) as raised:
        generate(client, *args, **kwargs)
    return str(raised.value)


# ----------------------------------------------------------------------------- gradio's client

@pytest.mark.slow
def test_client_gets_images_with_their_settings_and_the_faces_used(client):
    gallery, crops = generate(client, FACES, "a photo of f l on the moon", negative="blurry")
    assert [item["caption"] for item in gallery] == ["seed 0", "seed 1", "seed 2", "seed 3"]
    images = [Image.open(item["image"]) for item in gallery]
    assert all(image.format == "PNG" and image.size == (64, 64) for image in images)
    assert len({image.tobytes() for image in images}) == 4
    settings = json.loads(images[0].text["f2d_jax"])
    assert settings["prompt"] == "a photo of f l on the moon" and settings["images"] == ["obama.jpg", "biden.jpg"]
    assert settings["negative_prompt"] == "blurry" and settings["config"] == "tiny"
    assert (settings["steps"], settings["scheduler"]) == (30, "euler_a")
    for j, image in enumerate(images):  # each image's own seed, as its caption says
        assert json.loads(image.text["f2d_jax"])["seed"] == j
        assert image.text["parameters"].startswith("a photo of f l on the moon\nNegative prompt: blurry\nSteps: 30, "
                                                   f"Sampler: euler_a, CFG scale: 7.0, Seed: {j}, Size: 64x64")
    # the aligned 112x112 crop of each photo, named
    assert [item["caption"] for item in crops] == ["obama.jpg", "biden.jpg"]
    assert all(Image.open(item["image"]).size == (112, 112) for item in crops)


@pytest.mark.slow
def test_identity_scale_reaches_the_pipeline(client):
    def first_image(scale: float) -> Image.Image:
        gallery, _ = generate(client, [FACE], "a photo of f l", *DEFAULTS[:-1], scale)
        return Image.open(gallery[0]["image"])

    person, neutral = first_image(1.0), first_image(0.0)
    assert json.loads(neutral.text["f2d_jax"])["identity_scale"] == 0.0
    assert neutral.text["parameters"].endswith("Identity scale: 0.0")
    assert np.abs(np.asarray(person, np.int16) - np.asarray(neutral, np.int16)).mean() > 1


@pytest.mark.slow
def test_progress_follows_the_denoising_steps(client):
    job = client.submit([gradio_client.handle_file(FACE)], None, "f l as a knight", "", *DEFAULTS,
                        api_name="/generate")
    seen = set()
    while not job.done():
        for unit in job.status().progress_data or []:
            seen.add((unit.unit, unit.length, unit.desc))
        time.sleep(0.005)
    assert len(job.result()[0]) == 4
    assert ("step", 30, "sampling 4 images") in seen, seen


@pytest.mark.slow
def test_mistakes_and_warnings_are_one_line_each_in_the_servers_log(server, client, wall):
    """A refused request is one line in the log, no traceback; a warning goes to the page (gradio's toast, seen
    in the browser test) and is one line too."""
    before = len(server.log.read_text())
    app_error(client, [wall], "a photo of f l")
    generate(client, [FACE], "f l meets f l", *DEFAULTS[:-1], 1.2)
    assert server.log.read_text()[before:].splitlines() == [
        f"request refused: {NO_FACE}",
        "warning: the prompt has the identifier 'f l' twice; only the first stands for the person, the second is "
        "read as the words f and l: 'f l meets f l'",
        "warning: identity scale 1.2 > 1 extrapolates beyond the person's tokens; the images may degrade"]


@pytest.mark.slow
def test_a_photo_without_a_face_is_a_message_and_the_next_request_works(client, wall):
    assert app_error(client, [wall], "a photo of f l").endswith(NO_FACE)
    gallery, crops = generate(client, [FACE], "a photo of f l")
    assert len(gallery) == 4 and len(crops) == 1


@pytest.mark.parametrize("change, message", [
    (dict(prompt="a photo of a person"), "the prompt has no identifier 'f l'"),
    (dict(photos=[]), "upload at least one photo of the person's face"),
    (dict(expression=FACE), "an expression photo needs the expression encoder's weights: start the app with "
                            "--expression"),
    (dict(settings={0: 9}), "Value 9 is greater than maximum value 8."),
    (dict(settings={0: 0}), "Value 0 is less than minimum value 1."),
    (dict(settings={2: 151}), "Value 151 is greater than maximum value 150."),
    (dict(settings={2: 2.5}), "steps must be a whole number, got 2.5"),
    (dict(settings={5: 144}), "Value 144 is greater than maximum value 128."),
    (dict(settings={6: 40}), "width must be a multiple of 16, got 40"),
    (dict(settings={4: "heun"}), "Value: heun is not in the list of choices: ['euler_a', 'euler', 'ddim', 'dpm++2m']"),
    (dict(settings={7: 2.0}), "Value 2.0 is greater than maximum value 1.5."),
    (dict(settings={1: -1}), "seeds must be between 0 and 4294967295 (2^32 - 1), got -1"),
    (dict(settings={1: 2 ** 32 - 2}), "got 4294967294 to 4294967297 (image j uses seed + j, for 4 images)"),
])
@pytest.mark.slow
def test_bad_requests_are_messages(client, change, message):
    settings = list(DEFAULTS)
    for index, value in change.pop("settings", {}).items():
        settings[index] = value
    request = dict(photos=[FACE], prompt="a photo of f l", expression=None) | change
    assert message in app_error(client, request["photos"], request["prompt"], *settings,
                                expression=request["expression"])


@pytest.mark.slow
def test_photos_over_the_pixel_limit_are_refused_unread(client, tmp_path):
    path = tmp_path / "huge.png"
    Image.new("L", (6000, 5000)).save(path)
    assert app_error(client, [str(path)], "a photo of f l").endswith(
        "huge.png is 6000x5000 pixels: photos may have up to 25 megapixels")


@pytest.mark.slow
def test_uploads_are_limited_and_only_the_apps_folder_is_served(server, tmp_path):
    def upload(path: Path) -> httpx.Response:
        with open(path, "rb") as f:
            return httpx.post(f"{server.url}/gradio_api/upload", files={"files": (path.name, f)}, timeout=60)

    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(20 * 2 ** 20 + 1))
    refused = upload(big)
    assert (refused.status_code, refused.text) == (413, "File size exceeded maximum allowed size of 20971520 bytes.")
    [stored] = upload(Path(FACE)).json()
    assert Path(stored).parent.parent == server.folder
    assert httpx.get(f"{server.url}/gradio_api/file={stored}").content == Path(FACE).read_bytes()
    for path in [ROOT / "README.md", Path("/etc/passwd")]:  # the server's working directory, and elsewhere
        assert httpx.get(f"{server.url}/gradio_api/file={path}").status_code == 403


# ----------------------------------------------------------------------------- a browser

def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("F2D_REQUIRE_BROWSER"):
            pytest.fail("F2D_REQUIRE_BROWSER is set but there is no chromium: apt-get install chromium")
        pytest.skip("the browser test needs Debian's chromium: apt-get install chromium (F2D_REQUIRE_BROWSER=1 "
                    "makes its absence a failure)")
    return path


@pytest.mark.slow
def test_browser_upload_type_click_see_the_gallery_then_an_error_then_images(server, wall, tmp_path):
    chromium = _chromium()
    screenshot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "app.png"
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(server.url)
        expect(page.get_by_text('write "f l" where the person goes')).to_be_visible()
        photos, gallery = page.locator("#photos"), page.locator("#gallery img")

        def run(photo: str, prompt: str) -> None:
            photos.locator("input[type=file]").set_input_files(photo)
            page.locator("#prompt textarea").fill(prompt)
            page.locator("#generate").click()

        run(FACE, "a photo of f l on the moon")
        expect(gallery).to_have_count(4, timeout=120_000)
        expect(page.locator("#crops img")).to_have_count(1)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=screenshot, full_page=True)
        assert Image.open(screenshot).size[0] == 1280
        first = {img.get_attribute("src") for img in gallery.all()}

        photos.get_by_label("Clear").click()
        run(wall, "a photo of f l on the moon")
        expect(page.get_by_text(NO_FACE)).to_be_visible(timeout=60_000)

        photos.get_by_label("Clear").click()
        run(FACE, "f l as a knight beside f l")
        expect(page.get_by_text("the prompt has the identifier 'f l' twice")).to_be_visible(timeout=60_000)
        expect(gallery).to_have_count(4, timeout=120_000)
        page.wait_for_function("srcs => [...document.querySelectorAll('#gallery img')].every("
                               "img => !srcs.includes(img.getAttribute('src')))", arg=list(first), timeout=120_000)
        browser.close()


# ----------------------------------------------------------------------------- the command line

def test_a_bad_port_is_one_line_and_status_2():
    result = subprocess.run([sys.executable, "-m", "f2d_jax.app", "--port", "-1"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, "error: --port must be between 1 and 65535, got -1\n")


@pytest.mark.parametrize("argv, message", [
    (["--config", "nothing"], "error: no config file at nothing, and no named config 'nothing'"),
    (["--model", "nothing"], "error: nothing is not a packaged model (no f2d_model.json)"),
    (["--port", "{port}"], "error: cannot listen on 127.0.0.1 port {port}: Address already in use"),
    (["--port", "{port}", "--host", "0.0.0.0"], "error: cannot listen on 0.0.0.0 port {port}: Address already in use"),
])
@pytest.mark.slow
def test_command_line_mistakes_are_one_line(server, capsys, argv, message):
    argv = [arg.format(port=server.port) for arg in argv]
    assert app_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(port=server.port)) and err.count("\n") == 1, err


def test_without_gradio_the_app_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)
    assert app_cli.main(["--port", str(_free_port())]) == 2
    assert capsys.readouterr().err == "error: the web app needs gradio: pip install 'f2d-jax[app]'\n"


def test_one_weights_source_at_most(capsys):
    with pytest.raises(SystemExit) as raised:
        app_cli.main(["--model", "my-model", "--config", "tiny"])
    assert raised.value.code == 2
    assert "give one of --checkpoint, --config and --model, not --config and --model" in capsys.readouterr().err


@pytest.mark.slow
def test_the_page_on_flux_has_no_negative_prompt_one_sampler_and_makes_images():
    """On FLUX.1 the page hides the negative prompt (FLUX takes none), offers its one sampler, labels the guidance
    as the guidance embedding, and a request makes images with its defaults (3.5, "euler")."""
    import argparse

    from f2d_jax.app import page
    from f2d_jax.sampling import F2DPipeline

    pipe = F2DPipeline.from_config("tiny_flux", dtype="float32", log=lambda msg: None)
    limits = page.limits_for(pipe)
    assert (limits.defaults.guidance, limits.defaults.scheduler, limits.size_multiple) == (3.5, "euler", 16)
    components = {c.get("props", {}).get("elem_id") or c.get("props", {}).get("label"): c["props"]
                  for c in page.build(pipe, argparse.Namespace(), limits).config["components"]}
    assert components["negative"]["visible"] is False
    assert [choice[0] for choice in components["Sampler"]["choices"]] == ["euler"]
    assert "Guidance (FLUX.1's guidance embedding)" in components
    args = argparse.Namespace(checkpoint=None, config="tiny_flux", model=None)
    d = limits.defaults
    gallery, crops = page.generate_images(pipe, args, limits, [FACE], None, "a photo of f l", None, 2, 5, 2,
                                          d.guidance, d.scheduler, 64, 48, 1.0, progress=False)
    assert [caption for _, caption in gallery] == ["seed 5", "seed 6"] and len(crops) == 1
    assert gallery[0][0].size == (48, 64) and json.loads(gallery[0][0].info["f2d_jax"])["guidance"] == 3.5
    with pytest.raises(ValueError, match=r"^FLUX.1 reads a negative prompt only with true classifier-free guidance"):
        page.generate_images(pipe, args, limits, [FACE], None, "a photo of f l", "blurry", 1, 0, 1, d.guidance,
                             d.scheduler, 64, 64, 1.0, progress=False)
