"""`cnnlab demo` in a real headless Chromium, in front of a real `mlflow models serve` of a tiny fer_cnn."""
from __future__ import annotations

import base64
import os
import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import requests
from conftest import free_port, server_process
from PIL import Image

pytestmark = pytest.mark.services
REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "serving" / "samples"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
# as root, headless, and with no connection attempts of its own (this machine's network is closed)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1280,1000"]
FAKE_CAMERA = ["--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]
MAX_BODY_MB = 1  # the demo's limit in these tests: a too-large file costs 1 MB, not 16


def demo_server(model_url: str, log: Path):
    """`cnnlab demo` on a free port in front of model_url: (a context manager running it, its URL)."""
    url = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "cnnlab", "demo", "--model-url", model_url, "--port", url.rsplit(":", 1)[1],
           "--max-body-mb", str(MAX_BODY_MB)]
    return server_process(cmd, url + "/demo.js", log), url


@pytest.fixture(scope="module")
def demo(fer_champion, tmp_path_factory):
    """`cnnlab demo` in front of the model server."""
    started, url = demo_server(fer_champion, tmp_path_factory.mktemp("demo") / "demo.log")
    with started:
        yield url


def chromium(*flags: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: `make chromium` (apt-get install chromium "
                    f"chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="cnnlab-chromium-")
    for flag in [*CHROMIUM_FLAGS, *flags, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    """Chromium with a fake camera (a moving test pattern) that it may use without asking."""
    yield from chromium(*FAKE_CAMERA)


@pytest.fixture
def page(browser, demo):
    """The demo page, freshly loaded, once it knows whether the model server is up."""
    browser.get(demo)
    wait(browser, lambda: "ready" in text(browser, "#model-status"))
    return browser


def wait(browser, condition, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda _: condition())


def text(browser, css: str) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, css).text


def all_text(browser, css: str) -> list[str]:
    from selenium.webdriver.common.by import By

    return [e.text for e in browser.find_elements(By.CSS_SELECTOR, css)]


def upload(browser, path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "file").send_keys(str(path))


def answered(browser, name: str) -> str:
    """Wait until the page shows the answer about file `name`: 'result' or 'error'."""
    def state():
        if browser.find_element("id", "error").is_displayed() and name in text(browser, "#error"):
            return "error"
        if browser.find_element("id", "result").is_displayed() and text(browser, "#result-title").startswith(name):
            return "result"
        return None
    return wait(browser, state)


def ask_model(model_url: str, path: Path, detect_faces: bool = True) -> dict:
    """The model server's own answer about one image file."""
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(path.read_bytes()).decode()]]},
            "params": {"detect_faces": detect_faces}}
    r = requests.post(model_url + "/invocations", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def assert_card(browser, index: int, expected: dict, title: str) -> None:
    """Card `index` names the expected label and lists every class with its probability, as the model answered."""
    card = browser.find_elements("css selector", ".face-card")[index]
    p = expected[f"prob_{expected['label']}"]
    assert card.find_element("css selector", "h3").text == f"{title}: {expected['label']} ({100 * p:.1f}%)"
    rows = [r.text.split("\n") for r in card.find_elements("css selector", ".probs li")]
    classes = [k.removeprefix("prob_") for k in expected if k.startswith("prob_")]
    assert [r[0] for r in rows] == classes and len(classes) == 7
    for (name, shown), cls in zip(rows, classes):
        assert abs(float(shown.rstrip("%")) - 100 * expected[f"prob_{cls}"]) <= 0.051, (name, shown)
    top = card.find_element("css selector", ".probs li.top").text.split("\n")[0]
    assert top == expected["label"]


def assert_boxes(browser, detections: list[dict], natural: tuple[int, int]) -> None:
    """One box per face, where the model found it on the shown photo, tagged with its label and probability."""
    photo = browser.find_element("id", "photo").rect
    boxes = browser.find_elements("css selector", "#stage .box")
    assert len(boxes) == len(detections)
    scale = photo["width"] / natural[0]
    for i, (box, d) in enumerate(zip(boxes, detections)):
        r = box.rect
        for got, want in ((r["x"] - photo["x"], d["box"]["x"]), (r["y"] - photo["y"], d["box"]["y"]),
                          (r["width"], d["box"]["w"]), (r["height"], d["box"]["h"])):
            assert abs(got - want * scale) <= 2, (i, box.rect, d["box"], scale)
        p = d["prob_" + d["label"]]
        assert box.text == f"{i + 1} {d['label']} {100 * p:.1f}%"


def test_two_faces_boxed_with_emotion_and_probabilities(page, fer_champion, demo, tmp_path):
    photo = SAMPLES / "two_faces.jpg"
    expected = ask_model(fer_champion, photo)
    assert expected["faces"] == 2
    upload(page, photo)
    assert answered(page, "two_faces.jpg") == "result"
    assert text(page, "#result-title") == "two_faces.jpg: 2 face(s) found"
    assert not page.find_element("id", "no-face").is_displayed()
    assert_boxes(page, expected["detections"], (640, 360))
    for i, d in enumerate(expected["detections"]):
        assert_card(page, i, d, f"Face {i + 1}")
    heat = page.find_elements("css selector", ".face-card img.heat")  # Grad-CAM beside each face's probabilities
    assert len(heat) == 2 and all(h.get_attribute("src").startswith("data:image/png;base64,") for h in heat)
    wait(page, lambda: all(h.get_property("naturalWidth") > 0 for h in heat))  # decodes: a real PNG
    assert text(page, "#caption").endswith("Model version 1.")  # the version `cnnlab serve` answered with
    page.save_screenshot(str(tmp_path / "two_faces.png"))
    assert Image.open(tmp_path / "two_faces.png").size[0] >= 1000
    loaded = page.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert loaded and all(u.startswith(demo + "/") or u.startswith("blob:") for u in loaded), loaded  # offline


def test_dropped_photo(page):
    """A file dropped on the drop zone (a DragEvent carrying the file, as a real drag would) is analyzed."""
    page.execute_script("""
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const files = new DataTransfer();
        files.items.add(new File([bytes], "dropped.jpg", {type: "image/jpeg"}));
        const drop = new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true});
        document.getElementById("drop").dispatchEvent(drop);
    """, base64.b64encode((SAMPLES / "two_faces.jpg").read_bytes()).decode())
    assert answered(page, "dropped.jpg") == "result"
    assert text(page, "#result-title") == "dropped.jpg: 2 face(s) found"
    assert len(page.find_elements("css selector", "#stage .box")) == 2


def test_photo_rotated_by_exif_is_boxed_upright(page, fer_champion, tmp_path):
    """A phone photo: pixels stored sideways, EXIF says "rotate 90 degrees"; the boxes land on the faces shown."""
    sideways = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to show
    Image.open(SAMPLES / "two_faces.jpg").rotate(90, expand=True).save(sideways, quality=95, exif=exif)
    upright = ask_model(fer_champion, SAMPLES / "two_faces.jpg")["detections"]
    upload(page, sideways)
    assert answered(page, "phone.jpg") == "result"
    assert text(page, "#result-title") == "phone.jpg: 2 face(s) found"
    shown = page.execute_script("const p = document.getElementById('photo'); return [p.naturalWidth, p.naturalHeight]")
    assert shown == [640, 360]  # upright, as the browser shows the file
    photo = page.find_element("id", "photo").rect
    scale = photo["width"] / 640
    for box, d in zip(page.find_elements("css selector", "#stage .box"), upright):  # re-encoded: a few px off
        assert abs(box.rect["x"] - photo["x"] - d["box"]["x"] * scale) < 12 * scale, (box.rect, d["box"])
        assert abs(box.rect["y"] - photo["y"] - d["box"]["y"] * scale) < 12 * scale, (box.rect, d["box"])


def test_no_face_then_the_whole_image(page, fer_champion, tmp_path):
    blank = tmp_path / "wall.png"
    cv2.imwrite(str(blank), np.tile(np.linspace(60, 200, 320, dtype=np.uint8), (240, 1)))
    upload(page, blank)
    assert answered(page, "wall.png") == "result"
    assert text(page, "#no-face").startswith("No face found in wall.png.")
    assert page.find_elements("css selector", "#stage .box") == [] and all_text(page, ".face-card") == []
    page.find_element("id", "whole").click()
    wait(page, lambda: text(page, "#result-title") == "wall.png: the whole image")
    assert not page.find_element("id", "no-face").is_displayed()
    assert_card(page, 0, ask_model(fer_champion, blank, detect_faces=False), "Whole image")


def test_bad_uploads_show_a_clear_message(page, fer_champion, demo, tmp_path):
    cases = {  # file -> what the page must say
        "notes.txt": (b"a shopping list, not a photo\n", "notes.txt: not a PNG, JPEG or BMP image (29 bytes)"),
        "wide.png": (cv2.imencode(".png", np.zeros((8, 4097), np.uint8))[1].tobytes(),
                     "wide.png: image is 4097x8 pixels; the limit is 4096x4096 (CNNLAB_SERVING_MAX_SIDE)"),
        "huge.jpg": (os.urandom(MAX_BODY_MB * 2**20), "huge.jpg is 1.0 MB; this demo accepts images up to 0.7 MB."),
        "empty.jpg": (b"", "empty.jpg is empty."),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        upload(page, tmp_path / name)
        assert answered(page, name) == "error"
        assert text(page, "#error") == message
        assert not page.find_element("id", "result").is_displayed()
    upload(page, SAMPLES / "two_faces.jpg")  # and the next good photo works
    assert answered(page, "two_faces.jpg") == "result"
    page.save_screenshot(str(tmp_path / "after_errors.png"))
    # the demo server refuses a body over its limit itself, and keeps serving
    r = requests.post(demo + "/invocations", data=b"{" + b" " * (MAX_BODY_MB * 2**20), timeout=30,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "forwards up to 1 MB" in r.json()["message"]
    assert requests.get(demo + "/status", timeout=10).json()["ready"] is True


def test_webcam_snapshot(page):
    page.find_element("id", "camera-start").click()
    wait(page, lambda: page.find_element("id", "snapshot").is_displayed())
    assert page.find_element("id", "video").is_displayed()
    page.find_element("id", "snapshot").click()
    assert answered(page, "webcam snapshot") == "result"
    size = page.execute_script("const p = document.getElementById('photo'); return [p.naturalWidth, p.naturalHeight]")
    assert size[0] > 0 and size[1] > 0
    page.find_element("id", "camera-stop").click()
    assert not page.find_element("id", "video").is_displayed()


def test_no_model_server_and_no_camera_are_explained(tmp_path):
    """The page against a port where nothing listens, in a browser with no camera: it says so, never blank."""
    dead = f"http://127.0.0.1:{free_port()}"
    started, url = demo_server(dead, tmp_path / "demo.log")
    with started:
        r = requests.post(url + "/invocations", json={"inputs": [[[0]]]}, timeout=30)
        assert r.status_code == 502 and r.json()["error_code"] == "MODEL_SERVER_UNAVAILABLE"
        for browser in chromium():
            browser.get(url)
            wait(browser, lambda: "not reachable" in text(browser, "#model-status"))
            assert dead in text(browser, "#model-status")
            upload(browser, SAMPLES / "happy.jpg")
            assert answered(browser, "happy.jpg") == "error"
            assert text(browser, "#error").startswith(f"happy.jpg: the model server at {dead} is not reachable")
            browser.find_element("id", "camera-start").click()
            wait(browser, lambda: "Waiting" not in text(browser, "#camera-message"))
            assert text(browser, "#camera-message") == "No camera found: choose a photo instead."
            browser.save_screenshot(str(tmp_path / "no_model.png"))


def test_cli_refuses_a_bad_model_url(capsys):
    from cnnlab.cli import main

    assert main(["demo", "--model-url", "127.0.0.1:5000"]) == 2
    assert "--model-url must be an http:// or https:// URL, got '127.0.0.1:5000'" in capsys.readouterr().err
