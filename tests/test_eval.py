"""eval.py: the paper's metrics on hand-computed cases, a real face model on a real photograph,
the shipped prompt sets, bad input in one sentence, and the whole command on a scaled-down SDXL.

The face model is dlib's (weights inside the `face-recognition-models` package, no network); the
photograph is scikit-image's `astronaut` (Eileen Collins, NASA, public domain). The end-to-end
runs use tests/tiny_sdxl.py's SDXL, a mapper trained for two steps by train.py, and a tiny random
CLIP from tests/test_clip_vision.py: the images are noise to a face model, which is what the
no-face count is for.
"""

import importlib.util
import json
import math
import os
import runpy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import cli
import data
import eval as ev
from model import checkpoint, clip, mapper
from model.errors import UserError
from model.sdxl import SDXL
from tests.test_clip_vision import save_as_hub_folder, tiny_transformers_clip
from tests.tiny_sdxl import save_tiny_sdxl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Metrics against hand computations
# ----------------------------------------------------------------------------------------------

# A: three faces at 0°, 90°, 45°; B: two at cos 0.6; C: one face; D: no face at all.
A = t([1, 0], [0, 1], [1, 1])
B = t([1, 0], [0.6, 0.8])
C = t([0, 1])
D = torch.zeros(0, 2, dtype=torch.float64)


def test_face_sim_is_the_mean_over_identities_of_the_mean_pairwise_cosine():
    # A: pairs (0°,90°) 0, (0°,45°) 1/√2, (90°,45°) 1/√2 -> √2/3; B: 0.6; C has no pair, D no face.
    expected = (math.sqrt(2) / 3 + 0.6) / 2
    assert ev.face_similarity([A, B, C, D]) == pytest.approx(expected, abs=1e-12)
    # Embeddings are L2-normalised first: scaling one image's embedding changes nothing.
    assert ev.face_similarity([A * t([5], [1], [0.2]), B]) == pytest.approx(expected, abs=1e-12)


def test_face_div_is_one_minus_the_mean_cosine_between_identity_means():
    # Means of the normalised embeddings point along [1, 1] (A), [2, 1] (B), [0, 1] (C); D is left out.
    cos_ab, cos_ac, cos_bc = 3 / math.sqrt(10), 1 / math.sqrt(2), 1 / math.sqrt(5)
    assert ev.face_diversity([A, B, C, D]) == pytest.approx(1 - (cos_ab + cos_ac + cos_bc) / 3, abs=1e-12)


def test_identical_identities_have_face_sim_one_and_face_div_zero():
    same = t([0.3, 0.4, 0.5], [0.3, 0.4, 0.5])
    assert ev.face_similarity([same, same, same]) == pytest.approx(1, abs=1e-12)
    assert ev.face_diversity([same, same, same]) == pytest.approx(0, abs=1e-12)


def test_metrics_with_nothing_to_compare_are_nan_not_a_number_made_up():
    assert math.isnan(ev.face_similarity([C, D]))  # no identity has two faces
    assert math.isnan(ev.face_diversity([A, D]))  # one identity with faces: no pair of identities


def test_clip_t_is_the_raw_cosine_averaged_over_images():
    images, texts = t([1, 0], [0, 2]), t([1, 1], [0, -1])
    assert ev.clip_t(images, texts) == pytest.approx((1 / math.sqrt(2) - 1) / 2, abs=1e-12)  # not ×100


def test_dreamsim_similarity_is_one_minus_the_distance_averaged_like_face_sim():
    """DreamSim's distance is 1 − cos of its embeddings; 1 − d per pair, mean per identity, then over identities."""
    def distance(x, y):
        return 1 - torch.nn.functional.cosine_similarity(x, y, dim=0)

    expected = np.mean([np.mean([1 - float(distance(g[i], g[j])) for i in range(len(g)) for j in range(i + 1, len(g))])
                        for g in (A, B)])
    assert ev.dreamsim_similarity([A, B, C]) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# The dlib face model on a real photograph
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def faces():
    return ev.DlibFaces()


def astronaut_variants():
    """One face, four ways: a 320-px crop, shifted, scaled up 1.5×, brightened."""
    from skimage import data

    photo = data.astronaut()  # 512 × 512; the face is near (175..265, 76..166)
    crop = photo[:320, 60:380]
    shifted = photo[30:350, 20:340]
    scaled = np.asarray(Image.fromarray(crop).resize((480, 480), Image.BICUBIC))
    bright = np.clip(crop.astype(int) * 1.3 + 20, 0, 255).astype(np.uint8)
    return [crop, shifted, scaled, bright]


def grey_noise(seed, size=320):
    rng = np.random.default_rng(seed)
    return np.clip(128 + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)


def test_dlib_finds_the_same_face_in_shifted_scaled_and_brightened_copies(faces):
    embeddings = [faces(x) for x in astronaut_variants()]
    assert all(e is not None and e.shape == (128,) for e in embeddings)
    assert ev.face_similarity([torch.stack(embeddings)]) > 0.9


def test_dlib_finds_a_45_px_face_in_a_small_image_by_upsampling_it(faces):
    """The crop at half size: a 45-px face, below the HOG detector's 80 px until the image is upsampled once."""
    crop = astronaut_variants()[0]
    small = np.asarray(Image.fromarray(crop).resize((160, 160), Image.BICUBIC))
    e = faces(small)
    assert e is not None and float(e @ faces(crop)) > 0.9  # and it is the same face


def test_grey_noise_has_no_face(faces):
    assert faces(grey_noise(0)) is None and faces(grey_noise(1, 700)) is None


def test_the_largest_face_is_embedded(faces):
    """A small, brightened copy of the face beside a large one (the detector lists the small one
    first, more confident): the large one's embedding comes back, to the last digit."""
    crop, bright = astronaut_variants()[0], astronaut_variants()[3]
    canvas = np.full((700, 900, 3), 90, np.uint8)
    canvas[:320, :320] = bright
    canvas[:480, 400:880] = np.asarray(Image.fromarray(crop).resize((480, 480)))
    alone = np.full_like(canvas, 90)
    alone[:480, 400:880] = canvas[:480, 400:880]
    assert float(faces(canvas) @ faces(alone)) > 1 - 1e-9


# ----------------------------------------------------------------------------------------------
# The prompt sets in prompts/
# ----------------------------------------------------------------------------------------------


def scenes():
    with open(os.path.join(ROOT, "prompts", "scenes.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_portraits_is_the_paper_template_for_the_five_subject_words():
    prompts = ev.load_prompt_set("portraits")
    assert prompts == {s: [f"A {s} is looking at the camera."] for s in data.PEOPLE}


def test_scenes_has_50_sentences_per_setting_and_subject_and_no_duplicates():
    records = scenes()
    assert len(records) == 1000
    settings = {"daily life", "professional environments", "cultural or recreational occasions", "outdoor activities"}
    assert {r["setting"] for r in records} == settings and {r["subject"] for r in records} == set(data.PEOPLE)
    for setting in settings:
        for subject in data.PEOPLE:
            assert sum(r["setting"] == setting and r["subject"] == subject for r in records) == 50
    assert len({r["prompt"].lower() for r in records}) == 1000


def test_every_scene_names_its_subject_word_once_as_a_token_and_fits_77_tokens_with_a_pseudo_word():
    tokenizer = clip.Tokenizer.bundled(pad="eos")
    for r in scenes():
        ids = tokenizer.encode(r["prompt"])
        for word in data.PEOPLE:
            w = tokenizer.encode(word)
            hits = sum(ids[p:p + len(w)] == w for p in range(len(ids)))
            assert hits == (word == r["subject"]), (word, r["prompt"])
        # BOS + prompt + EOS + the pseudo-word CoCoIns inserts: nothing is truncated.
        assert len(ids) + 2 + 1 <= clip.CONTEXT_LENGTH, r["prompt"]
    # and the loader agrees: all 1,000 pass its checks
    assert sum(len(v) for v in ev.load_prompt_set("scenes").values()) == 1000


def test_the_committed_scenes_file_is_what_make_scenes_writes(tmp_path):
    make = runpy.run_path(os.path.join(ROOT, "prompts", "make_scenes.py"))
    make["main"](str(tmp_path / "scenes.jsonl"))
    with open(tmp_path / "scenes.jsonl", encoding="utf-8") as f:
        assert [json.loads(line) for line in f] == scenes()


@pytest.mark.parametrize("name, text, message", [
    ("no_subject.txt", "A man is looking at the camera.\nA cat is looking at the camera.\n",
     r"no_subject.txt line 2 \('A cat is looking at the camera.'\) must name exactly one subject word"),
    ("twice.jsonl", json.dumps({"subject": "woman", "prompt": "A woman talking to a woman."}) + "\n",
     r"must name its subject word 'woman' exactly once"),
    ("missing.jsonl", json.dumps({"subject": "girl", "prompt": "A woman reading."}) + "\n",
     r"line 1 \('A woman reading.'\) must name its subject word 'girl' exactly once"),
    ("other.jsonl", json.dumps({"subject": "woman", "prompt": "A woman and a man dancing."}) + "\n",
     r"names 'man' besides its subject word 'woman'"),
])
def test_a_prompt_line_without_its_subject_word_is_one_sentence(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        ev.load_prompt_set(str(path))


def test_plan_gives_every_image_its_own_seed_and_no_code_the_same_prompts_and_seeds():
    prompts = ev.load_prompt_set("scenes")
    jobs = ev.plan(prompts, codes=20, images_per_code=10)
    assert len(jobs) == 1000 and len({j.seed for j in jobs}) == 1000
    assert len({j.code for j in jobs}) == 100  # one code per identity, none shared across subject words
    for subject in data.PEOPLE:  # 20 × 10 = each subject word's 200 prompts, each once
        assert sorted(j.prompt for j in jobs if j.subject == subject) == sorted(prompts[subject])
    first = [j for j in jobs if j.identity == "woman-code20"]
    assert len({j.prompt for j in first}) == 10  # an identity meets ten different scenes
    plain = ev.plan(prompts, codes=20, images_per_code=10, use_codes=False)
    assert [(j.prompt, j.seed) for j in plain] == [(j.prompt, j.seed) for j in jobs]
    assert all(j.code is None for j in plain) and plain[0].identity == "man-group0"


# ----------------------------------------------------------------------------------------------
# The command end to end on a scaled-down SDXL
# ----------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SDXL, a mapper trained on it for two steps by train.py, and a tiny random CLIP folder."""
    import train
    from tests.test_data import make_celeba

    root = tmp_path_factory.mktemp("eval")
    _, _, single = save_tiny_sdxl(str(root / "sdxl"))
    make_celeba(str(root / "celeba"), n=4)
    run = root / "run"
    train.main([str(a) for a in ["--data", root / "celeba", "--weights", single, "--out", run, "--resolution", SIZE,
                                 "--batch-size", 2, "--steps", 2, "--num-workers", 0, "--device", "cpu",
                                 "--sample-every", 0, "--z-dim", 16, "--depth", 2, "--hidden", 32]])
    clip_folder = save_as_hub_folder(tiny_transformers_clip(), str(root / "clip"))
    return SimpleNamespace(root=root, weights=single, mapper=str(run), clip=clip_folder)


def eval_args(tiny, out, *extra):
    return [str(a) for a in ["--weights", tiny.weights, "--mapper", tiny.mapper, "--clip", tiny.clip, "--out", out,
                             "--face-model", "dlib", "--codes", 2, "--images-per-code", 2, "--steps", 2,
                             "--width", SIZE, "--height", SIZE, "--device", "cpu", "--batch-size", 3, *extra]]


@pytest.fixture(scope="module")
def portraits(tiny):
    out = tiny.root / "portraits"
    result = ev.main(eval_args(tiny, out, "--set", "portraits"))
    return SimpleNamespace(out=out, result=result)


def test_eval_writes_metrics_report_images_and_a_contact_sheet_per_subject_word(portraits):
    out = portraits.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["generated"] == 20  # 5 subject words × 2 codes × 2 images
    rows = metrics["rows"]
    assert set(rows) == {"all", *data.PEOPLE} and rows["all"]["images"] == 20 and rows["woman"]["identities"] == 2
    # 64-px images from a random tiny SDXL hold no face: counted, listed, and no made-up Face Sim.
    assert rows["all"]["no_face"] == 20 and len(metrics["no_face_images"]) == 20
    assert rows["all"]["face_sim"] is None and rows["all"]["face_div"] is None  # NaN in JSON: null
    if importlib.util.find_spec("dreamsim") is None:
        assert rows["all"]["dreamsim"] == "not installed" and "| not installed |" in (out / "report.md").read_text()
    assert -1 <= rows["all"]["clip_t"] <= 1
    report = (out / "report.md").read_text()
    assert "20 of 20 images had no detectable face (dlib)" in report and "| woman | 4 | 4 | n/a |" in report
    prompts = json.loads((out / "images" / "prompts.json").read_text())
    assert prompts["woman-code2/000-seed4.png"] == "A woman is looking at the camera."
    for subject in data.PEOPLE:
        with Image.open(out / f"contact_{subject}.png") as sheet:
            assert sheet.size == (2 * 128, 2 * 128)  # rows = codes, columns = images


def test_clip_t_in_the_report_is_the_tiny_clip_cosine_of_each_image_and_its_prompt(portraits, tiny):
    model = ev.load_clip(tiny.clip, "cpu")
    prompts = json.loads((portraits.out / "images" / "prompts.json").read_text())
    images = [ev.read_rgb(portraits.out / "images" / p) for p in prompts]
    i, t_ = ev.clip_embeddings(model, images, list(prompts.values()))
    assert portraits.result["rows"]["all"]["clip_t"] == pytest.approx(ev.clip_t(i, t_), abs=1e-6)


def test_clip_t_pairs_each_scene_image_with_the_prompt_it_was_generated_from(tiny, monkeypatch):
    """Scenes gives an identity's images different prompts: each image is scored against its own,
    the one stored in its PNG when it was made, not a sibling's."""
    import hashlib

    from model import clip_vision

    digest = lambda image: hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()  # noqa: E731
    scored, embed = [], ev.clip_embeddings
    monkeypatch.setattr(ev, "clip_embeddings", lambda model, images, prompts: (
        scored.extend(zip(map(digest, images), prompts)), embed(model, images, prompts))[1])
    out = tiny.root / "scenes"
    result = ev.main(eval_args(tiny, out, "--set", "scenes", "--codes", 1))
    model = ev.load_clip(tiny.clip, "cpu")
    tokenizer = clip.Tokenizer.bundled(pad="eos")
    made, own, sibling = [], [], []
    for folder in sorted(p for p in (out / "images").iterdir() if p.is_dir()):
        paths = sorted(folder.glob("*.png"))
        images = [ev.read_rgb(p) for p in paths]
        prompts = [json.loads(Image.open(p).text["parameters"])["prompt"] for p in paths]
        assert len(paths) == 2 and prompts[0] != prompts[1]
        made += zip(map(digest, images), prompts)
        with torch.no_grad():
            e_image = model.encode_image(torch.stack([clip_vision.clip_preprocess(x, model.vision_config.image_size)
                                                      for x in images]))
            e_text = model.encode_text(tokenizer(prompts))
        cos = torch.nn.functional.cosine_similarity(e_image[:, None].double(), e_text[None].double(), dim=-1)
        own += cos.diagonal().tolist()  # cos[i, j]: image i, prompt j
        sibling += cos.flip(1).diagonal().tolist()
    assert len(made) == 10 and sorted(scored) == sorted(made)  # every image went to CLIP with its own prompt
    assert result["rows"]["all"]["clip_t"] == pytest.approx(np.mean(own), abs=1e-6)
    # the tiny CLIP tells the two pairings apart, by over ten times the tolerance above (here by 2e-4)
    assert abs(np.mean(own) - np.mean(sibling)) > 1e-5


def test_a_rerun_generates_nothing_and_new_settings_generate_again(portraits, tiny, monkeypatch):
    before = {p: os.path.getmtime(p) for p in (portraits.out / "images").rglob("*.png")}
    ev.main(eval_args(tiny, portraits.out, "--set", "portraits"))
    assert json.loads((portraits.out / "metrics.json").read_text())["settings"]["generated"] == 0
    assert {p: os.path.getmtime(p) for p in (portraits.out / "images").rglob("*.png")} == before
    # One setting changed (guidance): every image is made again.
    ev.main(eval_args(tiny, portraits.out, "--set", "portraits", "--guidance", "1"))
    assert json.loads((portraits.out / "metrics.json").read_text())["settings"]["generated"] == 20


def test_a_mapper_retrained_in_place_makes_its_images_again(tiny, tmp_path):
    """A rerun keeps an image only if the mapper that made it is the one now at --mapper: the same
    path with new weights (train.py writing over it) is another mapper, whose images are made anew."""
    import shutil

    path = str(tmp_path / "mapper.safetensors")
    shutil.copy(cli.mapper_file(tiny.mapper), path)
    prompts = tmp_path / "one.txt"
    prompts.write_text("A woman is looking at the camera.\n")
    args = eval_args(tiny, tmp_path / "out", "--set", prompts, "--codes", 1) + ["--mapper", path]
    ev.main(args)
    images = sorted((tmp_path / "out" / "images").rglob("*.png"))
    old = [ev.read_rgb(p) for p in images]
    ev.main(args)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["generated"] == 0
    f = checkpoint.load_mapper(path)
    with torch.no_grad():
        for p in f.parameters():
            p.add_(torch.randn_like(p))
    checkpoint.save_mapper(path, f)
    ev.main(args)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["settings"]["generated"] == 2
    assert sorted((tmp_path / "out" / "images").rglob("*.png")) == images
    assert all(np.abs(ev.read_rgb(p).astype(int) - o).max() > 10 for p, o in zip(images, old))  # the new mapper's


def test_no_code_is_plain_sdxl_on_the_same_prompts_and_seeds(tiny):
    out = tiny.root / "plain"
    ev.main(eval_args(tiny, out, "--set", "portraits", "--no-code", "--codes", 1))
    path = out / "images" / "man-group0" / "001-seed1.png"
    with Image.open(path) as im:
        settings = json.loads(im.text["parameters"])
    assert settings["code"] is None and settings["seed"] == 1 and settings["prompt"] == "A man is looking at the camera."
    plain = SDXL.load(tiny.weights).generate(["A man is looking at the camera."], [1], steps=2, width=SIZE, height=SIZE)[0]
    assert np.abs(ev.read_rgb(path).astype(int) - plain).max() <= 1


def test_torchrun_splits_generation_and_scores_every_image_once(tiny):
    """Two CPU processes (gloo): each makes its share, rank 0 scores all of them."""
    import subprocess
    import sys

    out = tiny.root / "torchrun"
    env = {**os.environ, "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", os.path.join(ROOT, "eval.py"),
                        *eval_args(tiny, out, "--set", "scenes", "--codes", 1)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["generated"] == 10 and metrics["rows"]["all"]["images"] == 10
    assert len(list((out / "images").rglob("*.png"))) == 10 and not list((out / "images").rglob("*.tmp"))


@pytest.fixture(scope="module")
def bench_tiny(tmp_path_factory):
    """bench.py's tiny SDXL (a one-level UNet: three distinct compiled blocks) as an official single
    file, a tiny random CLIP, and a one-line prompt set: the smallest eval.py run inductor compiles."""
    from safetensors.torch import save_file

    from bench import bench
    from model.checkpoint import PREFIX

    root = tmp_path_factory.mktemp("bench_tiny")
    models = bench.build_ours(bench.tiny_size(), torch.device("cpu"), torch.float32, seed=0)
    weights = str(root / "tiny.safetensors")
    save_file({PREFIX[name] + k: v.contiguous() for name, m in models.items() for k, v in m.state_dict().items()}, weights)
    (root / "one.txt").write_text("A woman is looking at the camera.\n")
    return SimpleNamespace(weights=weights, clip=save_as_hub_folder(tiny_transformers_clip(), str(root / "clip")),
                           prompts=str(root / "one.txt"))


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_every_compile_mode_generates_the_eager_images(bench_tiny, tmp_path, mode):
    """--compile MODE through eval.py's whole command, compiled by inductor (gcc on the CPU): the
    images are made, by compiled graphs, and are the eager ones. (Inductor caches its kernels on
    disk: about 10 s a mode with that cache warm; with it empty, about 80 s of CPU for the two,
    most of it for `full`, which compiles the whole UNet and the VAE decoder.)"""
    from torch._dynamo.utils import counters

    out = tmp_path / mode
    graphs = counters["stats"]["unique_graphs"]
    ev.main([str(a) for a in ["--weights", bench_tiny.weights, "--no-code", "--clip", bench_tiny.clip, "--out", out,
                              "--set", bench_tiny.prompts, "--face-model", "dlib", "--codes", 1, "--images-per-code", 2,
                              "--steps", 1, "--width", SIZE, "--height", SIZE, "--device", "cpu", "--batch-size", 2,
                              "--compile", mode]])
    assert counters["stats"]["unique_graphs"] > graphs
    eager = SDXL.load(bench_tiny.weights).generate(["A woman is looking at the camera."] * 2, [0, 1], steps=1,
                                                   width=SIZE, height=SIZE)
    for m in range(2):
        image = ev.read_rgb(out / "images" / "woman-group0" / f"{m:03d}-seed{m}.png")
        assert np.abs(image.astype(int) - eager[m]).max() <= 1


def test_images_mode_scores_other_methods_folders_with_the_same_code(tiny, tmp_path):
    folder = tmp_path / "other_method"
    prompts = {}
    for k, img in enumerate(astronaut_variants()):
        (folder / "woman-a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / "woman-a" / f"{k}.png")
        prompts[f"woman-a/{k}.png"] = "an astronaut woman"
    (folder / "noise").mkdir()
    for k in range(2):
        Image.fromarray(grey_noise(k)).save(folder / "noise" / f"{k}.png")
    (folder / "prompts.json").write_text(json.dumps(prompts))
    result = ev.main(eval_args(tiny, tmp_path / "out", "--images", folder))
    rows = result["rows"]
    assert rows["all"]["images"] == 6 and rows["all"]["no_face"] == 2
    assert rows["all"]["face_sim"] > 0.9 and math.isnan(rows["all"]["face_div"])  # one identity with faces
    assert rows["woman"]["identities"] == 1 and -1 <= rows["all"]["clip_t"] <= 1


def test_dataset_mode_reads_celeba_identities(tiny, tmp_path):
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    (root / "Anno").mkdir()
    lines = []
    for k, img in enumerate(astronaut_variants() + [grey_noise(0), grey_noise(1), grey_noise(2)]):
        name = f"{k + 1:06d}.jpg"
        Image.fromarray(img).save(root / "img_align_celeba" / name, quality=95)
        lines.append(f"{name} {1 if k < 4 else 2}")
    lines.append("000099.jpg 3")  # identity 3 has one image: too few, never chosen
    (root / "Anno" / "identity_CelebA.txt").write_text("\n".join(lines) + "\n")
    result = ev.main(eval_args(tiny, tmp_path / "out", "--dataset", root, "--images-per-code", 3))
    rows = result["rows"]
    assert rows["all"]["identities"] == 2 and rows["all"]["images"] == 6 and rows["all"]["no_face"] == 3
    assert rows["all"]["face_sim"] > 0.9 and rows["all"]["clip_t"] == "no prompts"


# ----------------------------------------------------------------------------------------------
# Bad input: one sentence, before any generation
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_generation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("generation started before the input was checked")

    monkeypatch.setattr(ev, "generate", refuse)


def test_images_without_identity_folders_is_one_sentence(tiny, tmp_path, no_generation):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(grey_noise(0)).save(flat / "0.png")
    with pytest.raises(UserError, match="has no identity sub-folders of images; lay it out as .*/<identity>/<image>.png"):
        ev.main(eval_args(tiny, tmp_path / "out", "--images", flat))


def test_a_clip_path_that_is_not_clip_is_one_sentence(tiny, tmp_path, no_generation):
    with pytest.raises(UserError, match=r"--clip .*tiny_sdxl.safetensors is not a CLIP model"):
        ev.main(eval_args(tiny, tmp_path / "out", "--set", "portraits", "--clip", tiny.weights))
    with pytest.raises(UserError, match=r"--clip .*nowhere: no such file"):
        ev.main(eval_args(tiny, tmp_path / "out", "--set", "portraits", "--clip", tmp_path / "nowhere"))


def test_a_bad_prompt_set_is_one_sentence_before_generation(tiny, tmp_path, no_generation):
    bad = tmp_path / "bad.txt"
    bad.write_text("A dog is looking at the camera.\n")
    with pytest.raises(UserError, match="bad.txt line 1"):
        ev.main(eval_args(tiny, tmp_path / "out", "--set", bad))


def test_a_missing_face_package_is_one_sentence_naming_what_to_install(tiny, tmp_path, no_generation, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_dlib(name, *args, **kwargs):
        if name == "dlib":
            raise ImportError("No module named 'dlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_dlib)
    with pytest.raises(UserError, match=r"pip install dlib-bin face-recognition-models"):
        ev.main(eval_args(tiny, tmp_path / "out", "--set", "portraits"))


@pytest.mark.skipif(importlib.util.find_spec("insightface") is not None, reason="insightface is installed here")
def test_arcface_without_insightface_is_one_sentence(tiny, tmp_path, no_generation):
    with pytest.raises(UserError, match=r"--face-model arcface needs insightface; install it with `pip install insightface"):
        ev.main(eval_args(tiny, tmp_path / "out", "--set", "portraits", "--face-model", "arcface"))


def test_missing_clip_weights_say_where_to_get_them(tiny, tmp_path, no_generation, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    args = eval_args(tiny, tmp_path / "out", "--set", "portraits")
    i = args.index("--clip")
    with pytest.raises(UserError, match="no CLIP ViT-L/14 weights found .* --clip PATH"):
        ev.main(args[:i] + args[i + 2:])


def test_clip_weights_are_found_in_the_hugging_face_cache(tiny, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / ev.CLIP_HUB_FOLDER / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    os.symlink(os.path.join(tiny.clip, "model.safetensors"), snapshot / "model.safetensors")
    (tmp_path / "hub" / ev.CLIP_HUB_FOLDER / "refs").mkdir()
    (tmp_path / "hub" / ev.CLIP_HUB_FOLDER / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert ev.find_clip_weights() == str(snapshot / "model.safetensors")


def test_help_documents_every_flag():
    import contextlib
    import io

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        ev.parse_args(["--help"])
    for flag in ("--set", "--images", "--dataset", "--out", "--mapper", "--no-code", "--codes", "--images-per-code",
                 "--batch-size", "--face-model", "--clip", "--weights", "--vae", "--steps", "--guidance", "--eta",
                 "--width", "--height", "--device", "--dtype", "--attention", "--compile"):
        assert flag in text.getvalue()
