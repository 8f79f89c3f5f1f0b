"""demo.py, the Gradio page: every mistake in its fields is one sentence, and the page itself,
served on 127.0.0.1 and driven in a real headless Chromium, loads, draws a labelled grid for two
codes and two prompts, and that grid's cells are sample.py's images for the same settings, pixel
for pixel. The tiny SDXL and random mapper of tests/test_sample_cli.py stand in for real weights.

The browser tests need `pip install -r requirements-demo.txt -r requirements-test.txt` and Debian's
`chromium` and `chromium-driver` packages (.ci/run installs them); without them they are skipped,
saying what is missing. The same harness takes the README's screenshot:

    python tests/test_demo.py --screenshot docs/demo.png [demo.py's flags, e.g. --weights W --mapper M]
"""

import argparse
import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # as a script (the screenshot), the project's modules and tests/ import from here

import demo  # noqa: E402
from model.errors import UserError  # noqa: E402
from tests.test_sample_cli import tiny  # noqa: E402,F401  (the fixture: tiny SDXL, random mapper)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"  # Debian's packages
# Chromium as root on a machine with a closed network: no sandbox, no GPU, none of its own traffic
# (update checks, sync, QUIC probes), a fresh profile each time.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIZE = 64
READING, SURFING = "a woman reading a book", "a woman surfing a wave"


# ----------------------------------------------------------------------------------------------
# The fields, checked before anything is drawn
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, codes", [("0, 3, 7", [0, 3, 7]), ("0-3", [0, 1, 2, 3]), (" 2 - 4 ,9, ", [2, 3, 4, 9]),
                                         ("5", [5]), ("7-7", [7])])
def test_codes_are_a_list_a_range_or_both(text, codes):
    assert demo.parse_codes(text, prompts=1) == codes


CODE_MISTAKES = {
    "9-3": "code range 9-3 is empty: write the smaller code first (3-9)",
    "": "enter at least one code",
    " , ": "enter at least one code",
    "a woman": "'a woman' is neither a code nor a range",
    "-1": "'-1' is neither a code nor a range: codes are whole numbers from 0",
    "1.5": "'1.5' is neither a code nor a range",
    "0-12": "0-12 with 2 prompt(s) makes 26 images, and the page draws at most 24",
    # counted before it is spelled out: a huge range is refused at once, not built
    "0-1000000000000000000000": "makes 2000000000000000000002 images",
    "3, 1-4": "code 3 is listed twice",
    str(2**63): "a code must be a whole number from 0 to 2**63 - 1",
}


@pytest.mark.parametrize("text", CODE_MISTAKES)
def test_a_code_mistake_is_one_sentence(text):
    with pytest.raises(UserError) as e:
        demo.parse_codes(text, prompts=2)
    assert CODE_MISTAKES[text] in str(e.value) and "\n" not in str(e.value)


# (codes, prompts, seed, steps, guidance, --concept) -> what the one sentence says
FIELD_MISTAKES = {
    "prompt_without_the_concept": (("1", f"{READING}\na man surfing", 0, 2, 5.0, None),
                                   "the concept word 'woman' does not appear in the prompt 'a man surfing'"),
    "no_concept_word_at_all": (("1", "a lighthouse", 0, 2, 5.0, None), "found 0 concept word(s)"),
    "concept_flag_not_in_prompt": (("1", READING, 0, 2, 5.0, "dog"),
                                   "the concept word 'dog' does not appear in the prompt 'a woman reading a book'"),
    "no_prompt": (("1", "\n  \n", 0, 2, 5.0, None), "enter at least one prompt"),
    "empty_range": (("9-3", READING, 0, 2, 5.0, None), "code range 9-3 is empty"),
    "negative_seed": (("1", READING, -1, 2, 5.0, None), "a seed is a whole number from 0 to 2**64 - 1"),
    "zero_steps": (("1", READING, 0, 0, 5.0, None), "use at least 1 step and at most 999"),
    "emptied_seed": (("1", READING, None, 2, 5.0, None), "enter a number for the seed"),
    "emptied_guidance": (("1", READING, 0, 2, None, None), "enter a number for the guidance"),
}


@pytest.mark.parametrize("name", FIELD_MISTAKES)
def test_a_field_mistake_is_one_sentence(name):
    fields, message = FIELD_MISTAKES[name]
    with pytest.raises(UserError) as e:
        demo.check_inputs(*fields)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_fields_give_codes_prompts_and_the_concept_the_first_prompt_names():
    fields = demo.check_inputs("2, 0", f" {READING} \n\n{SURFING}", 0, 2, 5.0, None)
    assert fields == ([2, 0], [READING, SURFING], "woman")
    assert demo.check_inputs("1", "a man and a woman", 0, 2, 5.0, "woman")[2] == "woman"


# (demo.py's flags, what its one error line says); each is found before Gradio or the weights load
START_UP_MISTAKES = {
    "width_not_multiple_of_8": (["--width", 100], "multiples of 8"),
    "no_mapper": (["--mapper", "no/mapper.safetensors"], "no trained mapper at no/mapper.safetensors"),
    "mapper_is_not_a_mapper": (["--mapper", "WEIGHTS"], "is not a CoCoIns mapper checkpoint"),
}


@pytest.mark.parametrize("name", START_UP_MISTAKES)
def test_a_start_up_mistake_ends_in_one_error_line_before_anything_loads(tiny, name):
    from tests.test_sample_cli import assert_one_error_line

    flags, says = START_UP_MISTAKES[name]
    flags = ["--weights", tiny[0], "--mapper", tiny[2], *[tiny[0] if a == "WEIGHTS" else a for a in flags]]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), *map(str, flags)], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    assert_one_error_line(r, says, before_loading=True)


# ----------------------------------------------------------------------------------------------
# The grid: one image per cell, the progress told
# ----------------------------------------------------------------------------------------------

class Progress:
    """Gradio's progress tracker as draw_grid uses it, keeping what it was told."""

    def __init__(self):
        self.told = []

    def tqdm(self, cells, desc, unit):
        self.told.append((list(cells), desc, unit))
        return iter(cells)


def test_draw_grid_draws_a_cell_per_code_and_prompt_row_by_row_and_counts_them(tiny):
    from model.checkpoint import load_mapper
    from model.sdxl import SDXL

    model, f = SDXL.load(tiny[0]), load_mapper(tiny[2])
    progress = Progress()
    images = demo.draw_grid(model, f, model.dtype, [1, 2], "woman", [READING, SURFING], 0, 1, 5.0, SIZE, SIZE, progress)
    assert progress.told == [([(1, READING), (1, SURFING), (2, READING), (2, SURFING)], "images", "images")]
    assert len(images) == 4 and all(i.shape == (SIZE, SIZE, 3) and i.dtype == np.uint8 for i in images)
    # rows are codes, columns prompts: the code changes each column's image, the prompt each row's
    assert not np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])


# ----------------------------------------------------------------------------------------------
# The page in a real browser
# ----------------------------------------------------------------------------------------------

def missing_for_the_browser() -> list[str]:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    for package in ("gradio", "selenium"):
        try:
            __import__(package)
        except ImportError:
            missing.append(package)
    return missing


browser_test = pytest.mark.skipif(bool(missing_for_the_browser()),
                                  reason=f"needs {', '.join(missing_for_the_browser())} (see .ci/run)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(flags, folder, timeout=120):
    """`python demo.py FLAGS` on a free 127.0.0.1 port, one thread, no GPU, offline; yields its URL
    once it answers, and always stops it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
           "TMPDIR": folder, "GRADIO_TEMP_DIR": os.path.join(folder, "gradio")}  # the grids' files, removed with folder
    log = open(os.path.join(folder, "demo.log"), "w+")
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "demo.py"), *flags, "--port", str(port)],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                log.seek(0)
                raise AssertionError(f"demo.py exited with {server.returncode}:\n{log.read()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"demo.py did not answer on {url} within {timeout} s")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@contextlib.contextmanager
def chromium(folder, width=1280, height=1000):
    """Debian's headless Chromium through its ChromeDriver, logging every request it makes; always quit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS + [f"--window-size={width},{height}", f"--user-data-dir={folder}/profile"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # the requests, for the offline check
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.set_page_load_timeout(60)
        browser.set_script_timeout(60)
        yield browser
    finally:
        browser.quit()


def wait_for(browser, find, timeout):
    """The first truthy find(browser) within timeout seconds (selenium's wait, with a clear failure)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.1).until(lambda b: find(b), f"waited {timeout} s")


def fill(browser, elem_id, text):
    """Type into a field as a user does: select what is there, delete it, type."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(str(text))


def open_page(browser, url):
    from selenium.webdriver.common.by import By

    browser.get(url)
    return wait_for(browser, lambda b: b.find_elements(By.ID, "generate"), 60)[0]


def grid_png(browser, timeout) -> bytes:
    """The grid the page shows, as the browser fetches it: the PNG file's bytes."""
    from selenium.webdriver.common.by import By

    img = wait_for(browser, lambda b: [i for i in b.find_elements(By.CSS_SELECTOR, "#grid img")
                                       if i.get_attribute("src")], timeout)[0]
    return base64.b64decode(browser.execute_async_script(
        """const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer()).then(buffer => {
            let s = "";
            for (const byte of new Uint8Array(buffer)) s += String.fromCharCode(byte);
            done(btoa(s)); });""",
        img.get_attribute("src")))


def hosts_requested(browser) -> set[str]:
    """Every host the page sent an http(s) or websocket request to."""
    from urllib.parse import urlsplit

    hosts = set()
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        url = {"Network.requestWillBeSent": lambda p: p["request"]["url"],
               "Network.webSocketCreated": lambda p: p["url"]}.get(message["method"], lambda p: "")(message["params"])
        if urlsplit(url).scheme in ("http", "https", "ws", "wss"):
            hosts.add(urlsplit(url).hostname)
    return hosts


@pytest.fixture(scope="module")
def page(tiny, tmp_path_factory):
    """(URL of demo.py serving the tiny SDXL at 64 px, a fresh headless Chromium)."""
    folder = str(tmp_path_factory.mktemp("demo"))
    flags = ["--weights", tiny[0], "--mapper", tiny[2], "--width", SIZE, "--height", SIZE, "--device", "cpu"]
    with serve([str(f) for f in flags], folder) as url, chromium(folder) as browser:
        yield url, browser


@browser_test
def test_the_page_draws_sample_pys_images_for_two_codes_and_two_prompts(page, tiny, tmp_path):
    from tests.test_sample_cli import image, run_sample

    url, browser = page
    generate = open_page(browser, url)
    assert browser.title == "CoCoIns"
    settings = {"seed": 3, "steps": 2, "guidance": 4.5}  # none a default: each must reach the pipeline
    # sample.py's images for the same settings, drawn (two processes) while the page draws
    flags = ["--weights", tiny[0], "--mapper", tiny[2], "--width", SIZE, "--height", SIZE, "--device", "cpu",
             "--prompt", READING, "--prompt", SURFING, *[a for k, v in settings.items() for a in (f"--{k}", v)]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = [pool.submit(run_sample, *flags, "--code", code, "--out", tmp_path / f"code{code}") for code in (1, 2)]
        fill(browser, "codes", "1, 2")
        fill(browser, "prompts", f"{READING}\n{SURFING}")
        for field, value in settings.items():
            fill(browser, field, value)
        generate.click()
        grid = Image.open(io.BytesIO(grid_png(browser, timeout=120)))
        for run in runs:
            assert run.result().returncode == 0, run.result().stderr

    # The PNG the page shows is sample.py's labelled grid: its axes in its text, its cells bottom right.
    assert json.loads(grid.text["rows"]) == {"code": [1, 2]}
    assert json.loads(grid.text["columns"]) == {"prompt": [READING, SURFING]}
    pixels = np.asarray(grid.convert("RGB")).astype(int)
    top, left = pixels.shape[0] - 2 * SIZE, pixels.shape[1] - 2 * SIZE  # the title and labels' margins
    for row, code in enumerate((1, 2)):
        for col in range(2):
            cell = pixels[top + row * SIZE: top + (row + 1) * SIZE, left + col * SIZE: left + (col + 1) * SIZE]
            expected = image(tmp_path / f"code{code}" / f"{col:03d}-seed3-code{code}.png")
            assert np.abs(cell - expected).max() == 0, f"code {code}, prompt {col + 1} differs from sample.py"
    # the labels whole beneath the grid; and the page never left this machine
    from selenium.webdriver.common.by import By

    legend = browser.find_element(By.ID, "legend").text
    assert READING in legend and SURFING in legend
    assert hosts_requested(browser) == {"127.0.0.1"}


@browser_test
@pytest.mark.parametrize("codes, prompts, message", [
    ("9-3", READING, "code range 9-3 is empty: write the smaller code first (3-9)"),
    ("1", f"{READING}\na man surfing", "the concept word 'woman' does not appear in the prompt 'a man surfing'"),
])
def test_the_page_says_whats_wrong_in_one_sentence_and_draws_nothing(page, codes, prompts, message):
    from selenium.webdriver.common.by import By

    url, browser = page
    generate = open_page(browser, url)  # a fresh page: no grid, no message yet
    fill(browser, "codes", codes)
    fill(browser, "prompts", prompts)
    generate.click()
    shown = wait_for(browser, lambda b: [t.text for t in b.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")
                                         if message in t.text], 30)
    assert shown and not browser.find_elements(By.CSS_SELECTOR, "#grid img")


# ----------------------------------------------------------------------------------------------
# The README's screenshot
# ----------------------------------------------------------------------------------------------

def screenshot(path, flags, timeout=600):
    """Serve demo.py with FLAGS, press Generate on the page's own example and save the whole page."""
    with tempfile.TemporaryDirectory() as folder, serve(flags, folder) as url, chromium(folder) as browser:
        open_page(browser, url).click()
        grid_png(browser, timeout)
        time.sleep(1)  # the image fades in
        # the whole page, not the window: a viewport as tall as the page
        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1280, "height": height, "deviceScaleFactor": 1, "mobile": False})
        browser.save_screenshot(path)
    print(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Take the README's screenshot of demo.py's page (other flags go "
                                                 "to demo.py)")
    parser.add_argument("--screenshot", required=True, help="PNG file to write")
    known, demo_flags = parser.parse_known_args()
    if missing_for_the_browser():
        sys.exit(f"error: the screenshot needs {', '.join(missing_for_the_browser())} (see .ci/run)")
    os.makedirs(os.path.dirname(os.path.abspath(known.screenshot)), exist_ok=True)
    screenshot(known.screenshot, demo_flags)
