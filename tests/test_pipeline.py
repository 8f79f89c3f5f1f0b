"""Whole-pipeline parity: `python sample.py` against diffusers' StableDiffusionXLPipeline.

A scaled-down SDXL (tests/tiny_sdxl.py) with random weights is saved as a diffusers folder and as
an official-layout single file. diffusers (DDIM scheduler, SDXL config) and `python sample.py`, run
as a user runs it, get the same prompt, negative prompt, seed, steps, guidance and size; the
images must agree to within 1/255 per pixel in float32. The prompts are ones on which the
original CLIP tokenizer and transformers' CLIPTokenizer agree (tests/test_tokenizer.py documents
where they differ).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_sdxl import save_tiny_sdxl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # 8x8 latents through the 3-level UNet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_sdxl(str(tmp_path_factory.mktemp("tiny_sdxl")))


def run_sample(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def diffusers_image(pipe, prompt, negative, seed, steps, guidance, eta):
    out = pipe(prompt=prompt, negative_prompt=negative or None, num_inference_steps=steps,
               guidance_scale=guidance, eta=eta, width=SIZE, height=SIZE, output_type="np",
               generator=torch.Generator("cpu").manual_seed(seed))
    return (out.images[0] * 255).round().astype(np.uint8)


CASES = [
    # prompt, negative prompt, seed, steps, guidance, eta
    ("a woman reading a book in a cafe", "", 0, 5, 5.0, 0.0),
    ("a portrait photo of a man, studio lighting", "blurry, low quality", 7, 4, 7.5, 0.0),
    ("a lighthouse at dawn", "", 3, 3, 5.0, 1.0),
    ("a red bicycle by a wall", "", 5, 3, 1.0, 0.0),  # no guidance: the conditional half alone
]


@pytest.mark.parametrize("layout", ["diffusers", "single_file"])
@pytest.mark.parametrize("case", CASES, ids=["plain", "negative_prompt", "eta1", "guidance1"])
def test_sample_py_reproduces_diffusers_image(tiny, tmp_path, layout, case):
    pipe, folder, single = tiny
    prompt, negative, seed, steps, guidance, eta = case
    out = tmp_path / "image.png"
    r = run_sample("--weights", folder if layout == "diffusers" else single, "--prompt", prompt,
                   "--negative-prompt", negative, "--seed", seed, "--steps", steps, "--guidance", guidance,
                   "--eta", eta, "--width", SIZE, "--height", SIZE, "--out", out, "--device", "cpu",
                   "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    ours = np.asarray(Image.open(out).convert("RGB"))
    ref = diffusers_image(pipe, prompt, negative, seed, steps, guidance, eta)
    assert ours.shape == ref.shape == (SIZE, SIZE, 3)
    assert ref.std() > 10  # a real image, not a flat one that would match anything flat
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


def test_png_records_its_parameters_and_the_command_that_remakes_it(tiny, tmp_path):
    _, folder, _ = tiny
    out = tmp_path / "a.png"
    r = run_sample("--weights", folder, "--prompt", "a red bicycle", "--seed", 5, "--steps", 2,
                   "--width", SIZE, "--height", SIZE, "--out", out, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    text = Image.open(out).text
    params = json.loads(text["parameters"])
    assert params["prompt"] == "a red bicycle" and params["seed"] == 5 and params["steps"] == 2
    assert "--seed 5" in text["command"] and "'a red bicycle'" in text["command"]


def test_several_prompts_and_seeds_give_one_png_each_and_a_contact_sheet(tiny, tmp_path):
    _, folder, _ = tiny
    r = run_sample("--weights", folder, "--prompt", "a cat", "--prompt", "a dog", "--num-images", 2,
                   "--steps", 1, "--width", SIZE, "--height", SIZE, "--out", tmp_path, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert len(pngs) == 5 and "contact_sheet.png" in pngs
    sheet = Image.open(tmp_path / "contact_sheet.png")
    # rows = prompts, columns = seeds: the 2 x 2 images in the lower right, labels in the margins
    assert sheet.size[0] > 2 * SIZE and sheet.size[1] > 2 * SIZE
    assert json.loads(sheet.text["rows"]) == {"prompt": ["a cat", "a dog"]}
    assert json.loads(sheet.text["columns"]) == {"seed": [0, 1]}
