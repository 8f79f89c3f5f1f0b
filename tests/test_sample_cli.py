"""`python sample.py` as a user runs it: CoCoIns codes, and one clear `error:` line for every mistake.

A tiny SDXL (tests/tiny_sdxl.py, random weights) and a random, untrained mapper stand in for the
real ones: an untrained mapper still maps each code to its own pseudo-word, which is all these
tests need (same code -> same image, other code -> other image, a code changes the image).
Image parity with diffusers is tests/test_pipeline.py's job; loading details are tests/test_sdxl.py's.
"""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from model.sdxl import SDXL
from tests.test_sdxl import FOREIGN
from tests.tiny_sdxl import _randomize, save_tiny_mapper, save_tiny_sdxl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
FAST = ["--steps", 2, "--width", SIZE, "--height", SIZE, "--device", "cpu"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(single file, diffusers folder, mapper file): a tiny SDXL and a random mapper for its encoders."""
    root = str(tmp_path_factory.mktemp("tiny_sdxl"))
    _, folder, single = save_tiny_sdxl(root)
    return single, folder, save_tiny_mapper(root, single)


def run_sample(*args, env=None, code=None):
    """Run sample.py (or `code`, a Python snippet standing in for it) in a fresh interpreter;
    `env` sets variables (None removes one). No GPU is visible, so runs are the same everywhere,
    and one thread each, so two runs share the two cores CI has."""
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **(env or {})}
    env = {k: v for k, v in env.items() if v is not None}
    command = [sys.executable, "-c", code] if code else [sys.executable, os.path.join(ROOT, "sample.py")]
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def run_all(commands: dict) -> dict:
    """name -> run_sample keyword arguments  =>  name -> result, two processes at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_sample, *kw.pop("args"), **kw) for name, kw in commands.items()}
        return {name: f.result() for name, f in futures.items()}


def image(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


READING, SURFING = "a woman reading a book", "a woman surfing a wave"
# --code runs the tests below compare: name -> arguments (after the weights, mapper, seed, out).
CODE_RUNS = {
    "code1": ["--code", 1, "--prompt", READING, "--prompt", SURFING],
    "code1_again": ["--code", 1, "--prompt", READING],
    "code2": ["--code", 2, "--prompt", READING],
    "no_code": ["--prompt", READING],
    "two_subjects": ["--code", 1, "--concept", "man", "--code", 2, "--concept", "woman",
                     "--prompt", "a man and a woman talking in a park"],
    # concepts found as CLIP tokens, in the order the prompt names them
    "two_subjects_found": ["--code", 1, "--code", 2, "--prompt", "a man and a woman talking in a park"],
    "possessive": ["--code", 1, "--prompt", "a woman's portrait, (smiling)"],
    "mapper_folder": ["--code", 1, "--prompt", READING, "--mapper", "MAPPER_FOLDER"],
    # the code1 run's two images and a third, in batches of two: the first batch holds both of code1's images
    "batched": ["--code", 1, "--prompt", READING, "--prompt", SURFING, "--prompt", READING, "--seed", 5,
                "--batch-size", 2],
    "one_at_a_time": ["--code", 1, "--prompt", READING, "--seed", 5],  # (after --seed 0: seeds 0 and 5)
}
# Mistakes: name -> (arguments after --weights, what the one error line must say).
MISTAKES = {
    "width_not_multiple_of_8": (["--prompt", "a cat", "--width", 1020], "multiples of 8"),
    "height_not_multiple_of_8": (["--prompt", "a cat", "--height", 1001], "multiples of 8"),
    "empty_prompt": (["--prompt", " "], "every --prompt must be non-empty"),
    "unknown_device": (["--prompt", "a cat", "--device", "tpu"], "unknown --device 'tpu'"),
    "cuda_without_cuda": (["--prompt", "a cat", "--device", "cuda"], "sees no CUDA GPU; use --device cpu"),
    "mps_without_mps": (["--prompt", "a cat", "--device", "mps"], "has none; use --device cpu"),
    "png_for_several_images": (["--prompt", "a cat", "--num-images", 2, "--out", "x.png"], "names one file but 2 images"),
    "zero_images": (["--prompt", "a cat", "--num-images", 0], "ask for at least one image"),
    "zero_batch": (["--prompt", "a cat", "--batch-size", 0], "--batch-size 0: a batch holds at least one image"),
    "zero_steps": (["--prompt", "a cat", "--steps", 0], "use at least 1 step"),
    "too_many_steps": (["--prompt", "a cat", "--steps", 2000], "--steps 2000: use at least 1 step and at most 999"),
    "eta_above_1": (["--prompt", "a cat", "--eta", 2], "--eta 2.0: use a number from 0"),
    "seed_out_of_range": (["--prompt", "a cat", "--seed", 2**64], "a seed is a whole number from 0 to 2**64 - 1"),
    "negative_code": (["--prompt", "a woman", "--code", -1], "a code must be a whole number from 0"),
    "mapper_is_not_a_mapper": (["--prompt", "a woman", "--code", 1, "--mapper", "WEIGHTS"],
                               "is not a CoCoIns mapper checkpoint"),
    "jpg_out": (["--prompt", "a cat", "--out", "x.jpg"], "images are written as PNG"),
    "out_is_a_file": (["--prompt", "a cat", "--out", "A_FILE"], "is a file, not a folder"),
    "concept_missing_in_second_prompt": (["--code", 1, "--prompt", "a woman reading", "--prompt", "a man surfing"],
                                         "the concept word 'woman' does not appear in the prompt 'a man surfing'"),
    "code_without_mapper": (["--prompt", "a woman", "--code", 1, "--mapper", "no/mapper.safetensors"],
                            "train one with `python train.py"),
    "concept_without_code": (["--prompt", "a woman", "--concept", "woman"], "--concept needs a --code"),
    "concept_not_in_prompt": (["--code", 1, "--concept", "dog", "--prompt", "a woman reading"],
                              "the concept word 'dog' does not appear in the prompt 'a woman reading'"),
    "no_concept_word_in_prompt": (["--code", 1, "--prompt", "a lighthouse"], "name one per code with --concept WORD"),
    # BOS, 74 words, "woman" at 75, EOS at 76: the pseudo-word would push "woman" past the 77 tokens
    "concept_pushed_past_the_limit": (["--code", 1, "--prompt", "red " * 74 + "woman"],
                                      "too long for 1 pseudo-word(s): inserting them pushes the concept word 'woman' "
                                      "past CLIP's 77-token limit"),
    # a full prompt (75 words) ending in its second subject
    "two_subjects_in_a_full_prompt": (["--code", 1, "--code", 2, "--prompt", "red " * 70 + "a man and a woman"],
                                      "too long for 2 pseudo-word(s)"),
    "one_occurrence_for_two_codes": (["--code", 1, "--code", 2, "--concept", "man", "--concept", "man",
                                      "--prompt", "a man reading"], "names 'man' only 1 time(s)"),
}
NOT_SDXL = ["sd1", "truncated", "folder_without_vae"]  # tests/test_sdxl.py FOREIGN cases, run through sample.py
# Runs sample.py as `python sample.py` would, with model/checkpoint.py's weights/ folder pointed elsewhere
# (a developer's checkout may hold the real weights).
SAMPLE_WITH_WEIGHTS_DIR = (
    "import runpy, sys; import model.checkpoint as c; c.WEIGHTS_DIR = sys.argv[1]; "
    "sys.argv = ['sample.py'] + sys.argv[2:]; runpy.run_path('sample.py', run_name='__main__')"
)


TOY_SAMPLING = {"width": 48, "height": 56, "steps": 2, "guidance": 3.5}


def make_toy(weights_dir, single, mapper) -> str:
    """A weights/ folder holding only toy/: the tiny SDXL as base.safetensors, the mapper, and a manifest."""
    import shutil

    toy = weights_dir / "toy"
    toy.mkdir(parents=True)
    shutil.copyfile(single, toy / "base.safetensors")
    shutil.copyfile(mapper, toy / "mapper.safetensors")
    (toy / "manifest.json").write_text(json.dumps({"sampling": TOY_SAMPLING, "words": {
        "concepts": ["man", "woman", "person"], "scenes": {"beach": "on the beach", "snow": "in the snow"}},
        "files": {"base.safetensors": {}, "mapper.safetensors": {}}}))
    return str(weights_dir)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Every sample.py run of this file, made once, two at a time: name -> (result, output path)."""
    single, folder, mapper = tiny
    tmp = tmp_path_factory.mktemp("runs")
    commands, outs = {}, {}
    (tmp / "mapper_folder").mkdir()
    (tmp / "mapper_folder" / "mapper.safetensors").write_bytes(open(mapper, "rb").read())
    (tmp / "a_file").write_text("not a folder")
    stand_in = {"MAPPER_FOLDER": tmp / "mapper_folder", "WEIGHTS": single, "A_FILE": tmp / "a_file"}
    for name, args in CODE_RUNS.items():
        outs[name] = tmp / name
        args = [stand_in.get(a, a) for a in args]
        commands[name] = dict(args=["--weights", single, "--mapper", mapper, "--seed", 0, "--out", outs[name], *FAST, *args])
    # --vae: the no_code run again with another VAE.
    other = AutoencoderKL.from_config(AutoencoderKL.load_config(os.path.join(folder, "vae")))
    _randomize(other, torch.Generator().manual_seed(1))
    other.save_pretrained(tmp / "other_vae", safe_serialization=True)
    outs["other_vae"] = tmp / "other_vae.png"
    commands["other_vae"] = dict(args=["--weights", single, "--vae", tmp / "other_vae", "--seed", 0,
                                       "--out", outs["other_vae"], "--prompt", READING, *FAST])
    for name, (args, _) in MISTAKES.items():
        args = [stand_in.get(a, a) for a in args]
        commands[name] = dict(args=["--weights", single, "--mapper", mapper, "--out", tmp / name, *FAST, *args])
    for kind in NOT_SDXL:
        os.makedirs(tmp / kind)
        path = FOREIGN[kind][0](str(tmp / kind), single, folder)
        commands[kind] = dict(args=["--weights", path, "--prompt", "a cat", "--out", tmp / kind, *FAST])
    home = tmp / "home"
    env = {var: None for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME")}
    commands["no_weights"] = dict(args=[tmp / "empty_weights", "--prompt", "a cat", "--out", home, *FAST],
                                  env={**env, "HOME": str(home)}, code=SAMPLE_WITH_WEIGHTS_DIR)
    # No SDXL anywhere, but a toy model in weights/toy/ (here the tiny SDXL and mapper, with a manifest whose
    # sampling settings are not SDXL's): it draws, with its manifest's settings for what is not given.
    toy = make_toy(tmp / "weights_with_toy", single, mapper)
    for name, extra in (("toy", []), ("toy_given", ["--steps", 1, "--width", 72]), ("toy_info", ["--info"]),
                        ("toy_missing_weights", ["--weights", tmp / "nowhere.safetensors"]),
                        ("toy_by_file", ["--weights", tmp / "weights_with_toy" / "toy" / "base.safetensors"]),
                        ("toy_missing_mapper", ["--mapper", tmp / "nowhere.safetensors"])):
        prompt = [] if name == "toy_info" else ["--prompt", "a photo of a woman on the beach"] + (
            [] if name == "toy_missing_weights" else ["--code", 3])
        outs[name] = tmp / name
        commands[name] = dict(args=[toy, *prompt, "--out", tmp / name, "--device", "cpu", *extra],
                              env={**env, "HOME": str(home)}, code=SAMPLE_WITH_WEIGHTS_DIR)
    return {name: (r, outs.get(name)) for name, r in run_all(commands).items()}


# ----------------------------------------------------------------------------------------------
# --code
# ----------------------------------------------------------------------------------------------

def output(runs, name, file=None):
    r, out = runs[name]
    assert r.returncode == 0, f"{name}: {r.stderr}"
    return image(out / file if file else out)


def test_same_code_gives_the_same_image_in_a_new_process(runs):
    first = output(runs, "code1", "000-seed0-code1.png")
    assert first.std() > 10  # a real image, not a flat one
    assert np.array_equal(first, output(runs, "code1_again", "000-seed0-code1.png"))


def test_batched_images_are_the_ones_drawn_alone_and_saved_in_order(runs):
    """--batch-size 2 over the (prompt, seed) pairs in order: each image within 1/255 of the one drawn alone (float
    rounding of batched kernels), under the name it gets without batching; the third batch is the first again."""
    files = sorted(p.name for p in runs["batched"][1].glob("0*.png"))
    assert files == ["000-seed0-code1.png", "001-seed5-code1.png", "002-seed0-code1.png", "003-seed5-code1.png",
                     "004-seed0-code1.png", "005-seed5-code1.png"]
    alone = {"000-seed0-code1.png": output(runs, "code1", "000-seed0-code1.png"),  # reading, seed 0
             "001-seed5-code1.png": output(runs, "one_at_a_time", "001-seed5-code1.png"),  # reading, seed 5
             "002-seed0-code1.png": output(runs, "code1", "001-seed0-code1.png")}  # surfing, seed 0
    for name, expected in alone.items():
        assert np.abs(output(runs, "batched", name).astype(int) - expected).max() <= 1, name
    # the third prompt is the first again, in a batch of the same two images: the same pixels
    for again, first in (("004-seed0-code1.png", "000-seed0-code1.png"), ("005-seed5-code1.png", "001-seed5-code1.png")):
        np.testing.assert_array_equal(output(runs, "batched", again), output(runs, "batched", first))


def test_a_code_works_across_prompts(runs):
    files = sorted(p.name for p in runs["code1"][1].glob("*.png"))
    assert files == ["000-seed0-code1.png", "001-seed0-code1.png", "contact_sheet.png"]
    reading, surfing = (output(runs, "code1", f) for f in files[:2])
    assert np.abs(reading - surfing).mean() > 1


def test_different_codes_give_different_images(runs):
    one, two = output(runs, "code1", "000-seed0-code1.png"), output(runs, "code2", "000-seed0-code2.png")
    assert np.abs(one - two).mean() > 1


def test_the_codes_pseudo_word_changes_the_image(runs):
    with_code, without = output(runs, "code1", "000-seed0-code1.png"), output(runs, "no_code", "000-seed0.png")
    assert np.abs(with_code - without).mean() > 1


def test_two_subjects_in_one_prompt_run_and_are_recorded_in_the_png(runs):
    assert output(runs, "two_subjects", "000-seed0-code1-code2.png").std() > 10
    png = Image.open(runs["two_subjects"][1] / "000-seed0-code1-code2.png")
    params = json.loads(png.text["parameters"])
    assert params["code"] == [1, 2] and params["concept"] == ["man", "woman"]
    assert "--code 1 --concept man --code 2 --concept woman" in png.text["command"]


def test_concept_words_are_found_as_tokens_in_the_order_the_prompt_names_them(runs):
    """--code 1 --code 2 on "a man and a woman": code 1 is the man, exactly as with --concept."""
    found = output(runs, "two_subjects_found", "000-seed0-code1-code2.png")
    assert np.array_equal(found, output(runs, "two_subjects", "000-seed0-code1-code2.png"))
    png = Image.open(runs["possessive"][1] / "000-seed0-code1.png")
    assert json.loads(png.text["parameters"])["concept"] == ["woman"]


@pytest.mark.parametrize("flags, expected", [
    (["--concept", "man", "--concept", "woman"], [(1, "man"), (2, "woman")]),
    (["--concept", "woman", "--concept", "man"], [(1, "woman"), (2, "man")]),
    ([], [(1, "man"), (2, "woman")]),  # found in the order the prompt names them
])
def test_each_code_reaches_its_own_concept_word(tiny, tmp_path, monkeypatch, flags, expected):
    """Which pseudo-word goes where, read at the insertion: code k's f(z_k) before its concept."""
    calls = spy_insertions(monkeypatch)
    single, _, mapper_path = tiny
    import sample

    sample.main(one_step_8px(single, mapper_path, tmp_path) + ["--code", "1", "--code", "2", *flags,
                                                                "--prompt", "a man talking to a woman"])
    assert_insertions(calls, mapper_path, "a man talking to a woman", expected)


def test_two_codes_for_one_concept_word_go_before_its_occurrences_in_order(tiny, tmp_path, monkeypatch):
    """"a man talking to another man": code 1 before the first man, code 2 before the second."""
    calls = spy_insertions(monkeypatch)
    single, _, mapper_path = tiny
    import sample

    prompt = "a man talking to another man"
    sample.main(one_step_8px(single, mapper_path, tmp_path) + ["--code", "1", "--code", "2", "--concept", "man",
                                                                "--concept", "man", "--prompt", prompt])
    assert_insertions(calls, mapper_path, prompt, [(1, "man"), (2, "man")])


def one_step_8px(weights, mapper_path, tmp_path):
    return ["--weights", weights, "--mapper", mapper_path, "--out", str(tmp_path / "x.png"), "--steps", "1",
            "--width", "8", "--height", "8", "--device", "cpu"]


def spy_insertions(monkeypatch):
    """Record every insert_many call of the real encode path (one per text encoder)."""
    from model import mapper

    calls, original = [], mapper.insert_many
    monkeypatch.setattr(mapper, "insert_many", lambda e, pairs, eos: calls.append(pairs) or original(e, pairs, eos))
    return calls


def assert_insertions(calls, mapper_path, prompt, expected):
    """Both encoders' insertions put f(z of code k) at the k-th expected word's own occurrence."""
    from model import clip
    from model.checkpoint import load_mapper
    from model.mapper import code_to_z

    f = load_mapper(mapper_path)
    ids = clip.Tokenizer.bundled(pad="eos")([prompt])[0].tolist()
    tok = clip.Tokenizer.bundled(pad="eos")
    # sample.py's dry run before loading, then CLIP-L and bigG (the empty negative prompt has no subjects)
    assert len(calls) == 3
    for encoder, pairs in enumerate(calls[1:]):
        seen = {}
        for (w, i), (code, word) in zip(pairs, expected, strict=True):
            occurrence = seen.get(word, 0)
            seen[word] = occurrence + 1
            (at,) = [p for p in range(1, len(ids)) if ids[p] == tok.encode(word)[0]][occurrence:occurrence + 1]
            assert i.tolist() == [at], (encoder, code, word)
            assert torch.allclose(w[0].float(), f(code_to_z(code, f.config.z_dim)[None])[encoder][0]), (encoder, code)


def test_the_contact_sheet_is_labelled_and_names_its_axes_in_png_text(runs):
    sheet = Image.open(runs["code1"][1] / "contact_sheet.png")
    assert json.loads(sheet.text["rows"]) == {"prompt": [READING, SURFING]}
    assert json.loads(sheet.text["columns"]) == {"seed": [0]}
    assert json.loads(sheet.text["parameters"])["code"] == [1]
    # the two images, one below the other, in the lower right; labels in the margins
    reading = output(runs, "code1", "000-seed0-code1.png")
    W, H = sheet.size
    assert W > SIZE and H > 2 * SIZE
    assert np.array_equal(image(runs["code1"][1] / "contact_sheet.png")[H - 2 * SIZE:H - SIZE, W - SIZE:], reading)
    assert np.asarray(sheet.convert("L"))[:H - 2 * SIZE].min() < 128  # text above the images


def test_help_shows_each_default_once_and_no_machine_paths(capsys):
    import sample

    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: [])" not in text and "(default: )" not in text
    assert ROOT not in text and "--seed SEED noise seed (repeat for several; default 0) --num-images" in text
    assert "--width WIDTH image width in pixels" in text and "--height HEIGHT image height in pixels" in text


def test_the_png_command_names_everything_that_decides_the_pixels(runs):
    command = Image.open(runs["code1_again"][1] / "000-seed0-code1.png").text["command"]
    assert "--weights " in command and "--mapper " in command and "--dtype float32" in command


def test_mapper_may_be_a_train_py_run_folder(runs):
    assert np.array_equal(output(runs, "mapper_folder", "000-seed0-code1.png"),
                          output(runs, "code1_again", "000-seed0-code1.png"))


def test_vae_flag_changes_the_decoded_image(runs):
    assert np.abs(output(runs, "other_vae") - output(runs, "no_code", "000-seed0.png")).mean() > 1


# ----------------------------------------------------------------------------------------------
# Mistakes: one `error:` line each, no traceback
# ----------------------------------------------------------------------------------------------

def assert_one_error_line(r, says: str, before_loading=False):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    # Only the status line may come before the error (for mistakes found once the weights are loaded), and the
    # line that says the toy model draws.
    assert all(line.startswith(("loading SDXL from ", "no SDXL weights found, so this draws with the toy model"))
               for line in lines[:-1]), r.stderr
    assert lines[-1].startswith("error: ") and says in lines[-1], r.stderr
    if before_loading:  # a user's mistake costs no minute of loading 7 GB
        assert len(lines) == 1, r.stderr


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.skipif(name == "mps_without_mps" and torch.backends.mps.is_available(),
                                                reason="this machine has MPS"))
    for name in MISTAKES])
def test_a_mistake_ends_in_one_error_line_before_anything_loads(runs, name):
    assert_one_error_line(runs[name][0], MISTAKES[name][1], before_loading=True)


@pytest.mark.parametrize("kind", NOT_SDXL)
def test_a_checkpoint_that_is_not_sdxl_ends_in_one_error_line(runs, kind):
    assert_one_error_line(runs[kind][0], FOREIGN[kind][1])


def test_without_sdxl_the_shipped_toy_model_draws_with_its_own_settings_and_says_so(runs):
    r, out = runs["toy"]
    assert r.returncode == 0, r.stderr
    note = [line for line in r.stderr.splitlines() if line.startswith("no SDXL weights found")]
    assert len(note) == 1 and "toy model in weights/toy/" in note[0] and "python weights/download.py" in note[0]
    assert "48 x 56 px" in note[0] and "man, woman, person" in note[0] and "beach, snow" in note[0]
    png = Image.open(next(out.glob("*.png")))
    params = json.loads(png.text["parameters"])
    assert png.size == (48, 56) and params["steps"] == 2 and params["guidance"] == 3.5 and params["code"] == [3]
    # the command that remakes it names the toy files: on a machine with SDXL it would otherwise draw with SDXL
    assert "--weights" in png.text["command"] and "toy/base.safetensors" in png.text["command"]
    assert "toy/mapper.safetensors" in png.text["command"]


def test_the_toy_model_named_by_its_file_draws_with_its_own_settings_and_mapper(runs):
    """--weights weights/toy/base.safetensors (as tests/test_method.py and a machine with SDXL name it): the
    manifest beside the file gives the settings not given, and the mapper beside it is the default; no note."""
    r, out = runs["toy_by_file"]
    assert r.returncode == 0, r.stderr
    assert "no SDXL weights found" not in r.stderr
    png = Image.open(next(out.glob("*.png")))
    params = json.loads(png.text["parameters"])
    assert png.size == (48, 56) and params["steps"] == 2 and params["guidance"] == 3.5 and params["code"] == [3]
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), output(runs, "toy", next(runs["toy"][1].glob("*.png")).name))


def test_a_setting_given_overrides_the_toy_models_own(runs):
    r, out = runs["toy_given"]
    assert r.returncode == 0, r.stderr
    png = Image.open(next(out.glob("*.png")))
    params = json.loads(png.text["parameters"])
    assert png.size == (72, 56) and params["steps"] == 1 and params["guidance"] == 3.5


def test_info_without_a_mapper_describes_the_toy_mapper(runs):
    r = runs["toy_info"][0]
    assert r.returncode == 0, r.stderr
    assert "toy/mapper.safetensors" in r.stdout


@pytest.mark.parametrize("name,says", [("toy_missing_weights", "nowhere.safetensors"),
                                       ("toy_missing_mapper", "--mapper")])
def test_a_given_file_that_is_not_there_fails_in_one_sentence_even_with_the_toy_model(runs, name, says):
    assert_one_error_line(runs[name][0], says)


def test_no_weights_anywhere_says_how_to_download_them(runs):
    r = runs["no_weights"][0]
    assert_one_error_line(r, "no SDXL weights found")
    assert "run `python weights/download.py`" in r.stderr and "--weights PATH" in r.stderr


@pytest.mark.parametrize("args,pairs", [
    (["--code", 1, "--concept", "man", "--code", 2, "--concept", "woman", "--prompt", "a man and a woman talking"],
     {1: "man", 2: "woman"}),
    (["--code", 2, "--concept", "man", "--code", 1, "--concept", "woman", "--prompt", "a man and a woman talking"],
     {2: "man", 1: "woman"}),
    (["--code", 1, "--code", 2, "--prompt", "a man and a woman talking"], {1: "man", 2: "woman"}),
    (["--code", 1, "--code", 2, "--prompt", "a woman and a man talking"], {1: "woman", 2: "man"}),
], ids=["given", "given_swapped", "found", "found_swapped"])
def test_each_code_reaches_the_concept_word_it_is_paired_with(tiny, tmp_path, monkeypatch, args, pairs):
    """The pseudo-words that reach the encoders before a concept word are the mapper's output for
    the code paired with that word: given in order with --concept, else the prompt's order."""
    import sample
    from model import checkpoint
    from model import mapper as mapper_lib

    single, _, mapper = tiny
    f = checkpoint.load_mapper(mapper)
    with torch.no_grad():
        want = {code: f(mapper_lib.code_to_z(code, f.config.z_dim)[None]) for code in pairs}
    seen = []

    def spy(self, prompts, subjects=None):
        seen.append(subjects)
        return encode_prompt(self, prompts, subjects)

    encode_prompt = SDXL.encode_prompt
    monkeypatch.setattr(SDXL, "encode_prompt", spy)
    sample.main(["--weights", single, "--mapper", mapper, "--out", str(tmp_path), "--steps", "1", "--guidance", "1",
                 "--width", "64", "--height", "64", "--device", "cpu", *map(str, args)])
    subjects = next(s for s in seen if s)
    assert [concept for _, _, concept in subjects] == list(pairs.values())
    for (w_l, w_g, concept), code in zip(subjects, pairs):
        assert pairs[code] == concept
        torch.testing.assert_close(w_l, want[code][0][0], rtol=0, atol=0)
        torch.testing.assert_close(w_g, want[code][1][0], rtol=0, atol=0)
