"""The method works: with the shipped toy model (weights/toy/), a code holds its person across scenes.

Parity tests prove our pieces equal diffusers'; they cannot see whether a code holds a person. This test draws
with the trained toy model, its full-CoCoIns mapper and its judge (toyworld/ship.py made them; its manifest
says how), through sample.py's own path (`sample.main`, as a user's command runs), and reads the images with
the judge, as toyworld/experiment.py does:

- codes' Face Sim (eval.py's, on the judge's embedding) is above the base model's without codes (images of the
  same prompts grouped by index: random people) by at least MARGIN;
- scene accuracy holds: the judge reads the prompt's scene in codes' images about as often as without codes;
- the same code on two seeds agrees more than two different codes do, scene by scene.

MARGIN comes from the toy world's measured gap, see below.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
from eval import face_similarity
from toyworld import judge as judge_lib, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "weights", "toy")
# Two codes per concept word; each in the six scenes on two seeds (48 images), and as many without a code.
CODES = {"woman": (1, 2), "man": (3, 4)}
SEEDS = (0, 1)
# The gap this test asks of Face Sim (codes minus no code), about half of what was measured: toyworld's first
# trained-text pass measured 0.221 (0.691 ± 0.014 against the base model's 0.470 ± 0.004, 3 mapper seeds,
# toyworld/RESULTS-trained-text.md), and this test measures 0.214 on the shipped model (0.838 against 0.625;
# scene accuracy 1.000 both; a code on two seeds 0.885 against two codes 0.333). Mutants that break the method
# fall far below it: the code's latent shuffled in each command, 0.008; the mapper's output zeroed, -0.071.
MARGIN = 0.10


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """(images with codes, their (concept, code, scene, seed)), (images without, their (concept, group, scene,
    seed)): every image made by sample.main, read back from its PNG."""
    if not os.path.isfile(os.path.join(TOY, "manifest.json")):
        pytest.fail("weights/toy/ is missing: the shipped toy model is part of the repository (python -m toyworld.ship)")
    out = tmp_path_factory.mktemp("method")
    weights = ["--weights", os.path.join(TOY, "base.safetensors"), "--mapper", os.path.join(TOY, "mapper.safetensors"),
               "--device", "cpu", "--batch-size", "12"]
    coded, coded_keys, plain, plain_keys = [], [], [], []
    threads = torch.get_num_threads()
    for concept, codes in CODES.items():
        prompts = [world.prompt(concept, scene) for scene in world.SCENES]
        for code in codes:
            # as a user runs it, one command per seed: python sample.py --code C --prompt P1 ... --prompt P6 --seed S
            # (a code must mean its person in every command, not only within one)
            for s in SEEDS:
                folder = out / f"{concept}-code{code}-seed{s}"
                sample.main([*weights, "--code", str(code), *sum([["--prompt", p] for p in prompts], []),
                             "--seed", str(s), "--out", str(folder)])
                coded += read(folder, len(prompts))
                coded_keys += [(concept, code, scene, s) for scene in world.SCENES]
            # the same prompts without a code, each group on seeds of its own: random people grouped by index
            folder = out / f"{concept}-group{code}"
            sample.main([*weights, *sum([["--prompt", p] for p in prompts], []),
                         *sum([["--seed", str(100 * code + s)] for s in SEEDS], []), "--out", str(folder)])
            plain += read(folder, len(prompts) * len(SEEDS))
            plain_keys += [(concept, code, scene, s) for scene in world.SCENES for s in SEEDS]
    torch.set_num_threads(threads)
    judge = judge_lib.Judge()
    judge.load_state_dict({k: v.float() if v.is_floating_point() else v
                           for k, v in load_file(os.path.join(TOY, "judge.safetensors")).items()})
    return (judge.read(stack(coded)), coded_keys), (judge.read(stack(plain)), plain_keys)


def read(folder, n) -> list[np.ndarray]:
    """sample.py's images in the order it made them (prompts, then seeds): 000-..., 001-..."""
    files = sorted(f for f in os.listdir(folder) if f[0].isdigit() and f.endswith(".png"))
    assert len(files) == n, files
    return [np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")) for f in files]


def stack(images) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def groups(keys) -> list[list[int]]:
    """Image indices per (concept, code)."""
    order = list(dict.fromkeys((c, k) for c, k, _, _ in keys))
    return [[i for i, key in enumerate(keys) if key[:2] == g] for g in order]


def scene_accuracy(reading, keys) -> float:
    truth = torch.tensor([world.SCENES.index(scene) for _, _, scene, _ in keys])
    return (reading["scene"] == truth).float().mean().item()


def test_codes_hold_people_far_above_the_base_models_chance(drawn):
    (coded, coded_keys), (plain, plain_keys) = drawn
    with_codes = face_similarity([coded["embedding"][g] for g in groups(coded_keys)])
    without = face_similarity([plain["embedding"][g] for g in groups(plain_keys)])
    assert with_codes - without >= MARGIN, (with_codes, without)


def test_codes_keep_the_prompts_scene(drawn):
    (coded, coded_keys), (plain, plain_keys) = drawn
    with_codes, without = scene_accuracy(coded, coded_keys), scene_accuracy(plain, plain_keys)
    assert with_codes >= 0.85 and with_codes >= without - 0.1, (with_codes, without)


def test_a_code_on_two_seeds_agrees_more_than_two_codes_do(drawn):
    (coded, keys), _ = drawn
    emb = torch.nn.functional.normalize(coded["embedding"].double(), dim=1)
    index = {key: i for i, key in enumerate(keys)}
    same, other = [], []
    for concept, codes in CODES.items():
        for scene in world.SCENES:
            for code in codes:
                # one code, two seeds
                same.append(float(emb[index[concept, code, scene, 0]] @ emb[index[concept, code, scene, 1]]))
            for s in SEEDS:
                # two codes of one concept word, one seed
                a, b = codes
                other.append(float(emb[index[concept, a, scene, s]] @ emb[index[concept, b, scene, s]]))
    assert np.mean(same) - np.mean(other) >= MARGIN / 2, (np.mean(same), np.mean(other))
