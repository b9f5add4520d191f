"""docs/demo.png: the demo page in headless Chromium, serving/samples/two_faces.jpg against a trained model.

    cnnlab train fer_cnn -P epochs=4 -P limit=6000 && cnnlab register fer_cnn
    python docs/demo_screenshot.py models:/fer_cnn@champion        # MLFLOW_TRACKING_URI: that store

`cnnlab serve` runs the model, `cnnlab demo` the page; the page asks for each face's Grad-CAM and shows the version.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from servers import ModelServer  # noqa: E402 - benchmarks/servers.py

from cnnlab.stack.supervisor import free_port, get_ok, wait_for  # noqa: E402


def main(model_uri: str, out: Path = REPO / "docs" / "demo.png") -> None:
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    root = Path(tempfile.mkdtemp(prefix="cnnlab-screenshot-"))
    server = ModelServer(root / "serve", model_uri, os.environ["MLFLOW_TRACKING_URI"], guarded=True).start(300)
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "cnnlab", "demo", "--model-url", server.url, "--port", str(port)])
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--window-size=1200,1100", "--hide-scrollbars"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        wait_for(lambda: get_ok(f"http://127.0.0.1:{port}/status"), "cnnlab demo", 60)
        browser.get(f"http://127.0.0.1:{port}/")
        browser.find_element("id", "file").send_keys(str(REPO / "serving" / "samples" / "two_faces.jpg"))
        WebDriverWait(browser, 120).until(lambda b: b.find_element("id", "result").is_displayed()
                                          and b.find_elements("css selector", ".face-card img.heat"))
        browser.save_screenshot(str(out))
        print(browser.find_element("id", "caption").text, [h.text for h in browser.find_elements("tag name", "h3")])
    finally:
        browser.quit()
        demo.terminate()
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1])
