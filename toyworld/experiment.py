"""The toy-world experiment: does CoCoIns turn codes into people, and do the paper's ablations hold?

One command runs it all and writes `toyworld/RESULTS.md` with its figures:

    python -m toyworld                  # the world, the base model, the judge, every row (≤ 3 h on 2 cores)
    python -m toyworld --rows core      # the dataset, the base model and full CoCoIns over 3 seeds
    python -m toyworld --scale smoke    # everything at toy-of-toy size in about a minute (CI)

Steps, each cached in `--work` (default toyworld/cache/; a rerun skips what exists):
1. the world (toyworld/world.py), exported as a CelebA-layout folder;
2. the base model (toyworld/base.py): its VAE, then its UNet and text encoders, saved as an
   official-layout SDXL single file;
3. the judge (toyworld/judge.py), with its held-out accuracy;
4. one mapper per row, trained by the project's own command:
       python train.py --data WORK/data --weights WORK/base.safetensors --resolution 64 ... FLAGS
   nothing toy-specific goes into train.py: the rows differ only in train.py's flags;
5. evaluation: for each row, codes x scenes x seeds images from the prompt
   "a photo of a {man|woman} {scene}" (no attribute: the code must fix the person), read by the
   judge, scored by eval.py's Face Sim and Face Div, identity agreement and scene accuracy.

Read next: toyworld/README.md (what the results say), RESULTS.md.
"""

import argparse
import glob
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from eval import face_diversity, face_similarity
from losses import word_spread
from model import ddim
from model.clip import EOS_ID
from model.checkpoint import load_mapper
from model.mapper import Mapper, MapperConfig, code_to_z
from model.sdxl import SDXL
from model.vae import AutoencoderKL
from toyworld import base, inversion, judge as judge_lib, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPTS = ("man", "woman")


# -- what is run -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    flags: tuple[str, ...] = ()  # train.py flags on top of the scale's common ones
    table: str = ""  # which comparison it belongs to
    paper: tuple[float, float] | None = None  # the paper's (Face Sim, Face Div), Portraits
    figure: str = ""  # a contact sheet of this row too, under this file name
    seeds: int = 1  # mapper seeds (more where a default hangs on the row)


FULL = Row("CoCoIns (full)", table="main", paper=(0.600, 0.799))
ROWS = [
    FULL,
    # First what tells why the full method does what it does: the scale of the negative term. The
    # default γ = 1e-2 was chosen from these rows (losses.py says why). 1e-4 was the default while the
    # base model's text encoders were random and frozen (RESULTS-frozen-text.md); it keeps 3 seeds.
    Row("γ = 1e-1 (x 10)", ("--gamma", "0.1"), "choices"),
    Row("γ = 1e-3 (/ 10)", ("--gamma", "0.001"), "choices"),
    Row("γ = 1e-4 (/ 100, the default with frozen text encoders)", ("--gamma", "0.0001"), "choices",
        figure="contact_cocoins_gamma_1e-4.png", seeds=3),
    Row("γ = 1e-5 (/ 1000)", ("--gamma", "0.00001"), "choices"),
    # Area normalisation divides d_m by the mask's share (here about 0.4): a larger distance, so a
    # ~2.5x weaker reciprocal term at the same γ. At the default γ, and at 1e-3 beside that row.
    Row("Masked distance normalised by area", ("--mask-reduction", "area"), "choices"),
    Row("Masked distance normalised by area, γ = 1e-3", ("--mask-reduction", "area", "--gamma", "0.001"), "choices"),
    # Training's timesteps reach the noisiest levels, where sampling decides the scene and the layout.
    Row("Training timesteps up to T (t ~ U[200, 1000))", ("--t-max", "1000"), "choices"),
    # Is the mapper's training budget what holds consistency below the base model's own (the row
    # that names each person in words)? The same run, four times as long.
    Row("Four times the training (K = 1600 steps)", ("--steps", "1600"), "choices"),
    # Three seeds: the first pass put the plain MLP ahead on one seed.
    Row("Mapper without output LayerNorm", ("--mapper-norm", "none"), "choices", seeds=3),
    # The plain MLP's words grow as loud as the negative term asks: the same at a tenth of the γ.
    Row("Mapper without output LayerNorm, γ = 1e-3", ("--mapper-norm", "none", "--gamma", "0.001"), "choices"),
    # Between a real token's spread (gain 1) and the plain MLP's words (~100x): how loud may a word be?
    Row("Mapper output gain 3 (a word 3x a real token's spread)", ("--mapper-gain", "3"), "choices", seeds=3),
    Row("Mapper output gain 10", ("--mapper-gain", "10"), "choices"),
    # ... and louder, towards the plain MLP's ~100x: where does a louder word start to buy consistency?
    Row("Mapper output gain 30", ("--mapper-gain", "30"), "choices"),
    Row("Mapper output gain 100", ("--mapper-gain", "100"), "choices"),
    # The l2 distance weighs a factor by its latent footprint squared (a shirt's ~40x a pair of
    # glasses'); l1 flattens that ~2.5x. At the default γ and at a γ scaled for l1's larger distances.
    Row("Distance L1", ("--distance", "l1"), "choices"),
    Row("Distance L1, γ = 4e-2", ("--distance", "l1", "--gamma", "0.04"), "choices"),
    # Every trained mapper's words vary in ~2 directions; does spreading them over more help?
    Row("Word spread λ = 1", ("--lambda-spread", "1"), "choices"),
    Row("Word spread λ = 10", ("--lambda-spread", "10"), "choices"),
    # Table 3: the consistency loss
    Row("Pos", ("--gamma", "0"), "table3", (0.394, 0.500)),
    Row("Pos + Neg (constant weight)", ("--beta", "0"), "table3", (0.492, 0.750)),
    Row("Pos + Neg (subtract)", ("--negative", "subtract"), "table3", (0.380, 0.444)),
    # Table 4: mask and background loss
    Row("Consistency loss, no mask", ("--mask", "none"), "table4", (0.444, 0.395)),
    Row("+ Mask (no background loss)", ("--lambda-back", "0"), "table4", (0.619, 0.352)),
    # Table 5: how the positive is made
    Row("Same prompts, different noise", ("--positive-prompt", "same"), "table5", (0.548, 0.686)),
    Row("Different prompts, same noise", ("--positive-noise", "same"), "table5", (0.306, 0.772)),
    # Not a row: train.py's `--time-ids sampling` is the same computation here, since every image of
    # this world is 64 px, square and uncropped, so its own size/crop conditioning is (64, 64, 0, 0,
    # 64, 64), which is what sampling passes (the earlier run gave identical numbers to the digit).
]
# Where each paper table's full-method row sits (the full method is the last row of each table).
PAPER_FULL = (0.600, 0.799)


@dataclass
class Scale:
    world_config: world.WorldConfig = field(default_factory=world.WorldConfig)
    base_config: base.BaseConfig = field(default_factory=base.BaseConfig)
    judge_images: int = 6000  # rendered images to train the judge on (each also seen through the VAE)
    judge_steps: int = 800
    mapper_steps: int = 400  # K, train.py --steps
    mapper_batch: int = 8
    mapper_lr: float = 1e-3
    checkpoint_every: int = 100  # also the spacing of the Face Sim curve
    codes: int = 8  # codes per concept word (man, woman)
    seeds: int = 2  # images per code and scene
    scenes: tuple[str, ...] = world.SCENES
    steps: int = 20  # DDIM steps
    guidance: float = 3.0
    mapper_seeds: int = 3  # seeds of the base-model and full-CoCoIns rows
    footprint_pairs: int = 200  # render pairs per factor for `factor_footprints`
    inversion_steps: int = 1000  # textual-inversion steps per person (toyworld/inversion.py); 200 gave 0.71 Face Sim, 1000 0.75
    inversion_images: int = 32  # renders of each person it learns from
    inversion_lr: float = 5e-2  # Adam's step on the word (in units of a token's spread)


SCALES = {
    "full": Scale(),
    "smoke": Scale(
        world_config=world.WorldConfig(identities=12, images_per_identity=2, named=6),
        base_config=base.BaseConfig(vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=4),
        judge_images=16, judge_steps=2, mapper_steps=2, mapper_batch=2, checkpoint_every=1,
        codes=2, seeds=1, scenes=("beach", "snow"), steps=2, mapper_seeds=2, footprint_pairs=2,
        inversion_steps=2, inversion_images=2,
    ),
}


# -- generation ------------------------------------------------------------------------------------


@torch.no_grad()
def generate(model: SDXL, jobs: list[dict], mapper=None, steps: int = 20, guidance: float = 3.0,
             batch: int = 64) -> torch.Tensor:
    """Images (N, 3, 64, 64) uint8 for jobs {"prompt", "seed", "concept", "code"}; codes need a mapper.

    Batched DDIM with classifier-free guidance against SDXL base's zero unconditional conditioning,
    the same computation as SDXL.generate for one image, many at a time."""
    out = []
    size = world.SIZE
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        B = len(chunk)
        subjects = None
        if mapper is not None:
            z = torch.stack([code_to_z(j["code"], mapper.config.z_dim) for j in chunk])
            w_l, w_g = mapper(z)
            subjects = [(w_l, w_g, [j["concept"] for j in chunk])]
        context, pooled = model.encode_prompt([j["prompt"] for j in chunk], subjects)
        # PITFALL (SDXL base): the unconditional branch of an empty negative prompt is all zeros.
        context = torch.cat([context, torch.zeros_like(context)])
        pooled = torch.cat([pooled, torch.zeros_like(pooled)])
        time_ids = model.time_ids(size, size, 2 * B, model.device)

        def eps_fn(x_t, t):
            return model.unet(torch.cat([x_t, x_t]), t.repeat(2), context, pooled, time_ids).float().chunk(2)

        # x_T: each image its own seed, drawn as SDXL.generate draws one image's noise.
        x_T = ddim.randn((B, 4, size // 8, size // 8), [torch.Generator().manual_seed(j["seed"]) for j in chunk],
                         model.device, torch.float32)
        x_0 = ddim.sample(eps_fn, x_T, steps, guidance)
        out.append(torch.from_numpy(model.decode(x_0)).permute(0, 3, 1, 2))
    return torch.cat(out)


def eval_jobs(scale: Scale, offset: int = 0) -> list[dict]:
    """codes x scenes x seeds per concept word; the seed depends on (concept, code, scene, repeat) so
    that, without pseudo-words, the images grouped under one code index are random people.
    `offset` shifts every seed (the base model's rows over several seeds)."""
    jobs = []
    for c, concept in enumerate(CONCEPTS):
        for code in range(scale.codes):
            for s, scene in enumerate(scale.scenes):
                for r in range(scale.seeds):
                    jobs.append({"concept": concept, "code": 1000 * (c + 1) + code, "scene": scene,
                                 "prompt": world.prompt(concept, scene),
                                 "seed": 1_000_003 * offset + 100_000 * c + 1000 * code + 10 * s + r})
    return jobs


# The attributes `named_jobs` puts into words, from one to all seven: a ladder of how much of a
# person words alone fix in this base model, against which one pseudo-word is measured.
NAMED = {"1 (shirt colour)": ("shirt",), "3 (+ pattern, hair colour)": ("shirt", "pattern", "hair"),
         "all 7": tuple(world.FACTORS)}


def code_person(code: int, concept: str) -> world.Identity:
    """The person a code index stands for in the rows that name it (`named_jobs`) or learn a word for it
    (`inversion`): fixed random factors drawn from the code, the concept word's gender."""
    rng = random.Random(code)
    names = {f: rng.choice(values) for f, values in world.FACTORS.items()} | {"gender": concept}
    return world.Identity(*(world.FACTORS[f].index(names[f]) for f in world.FACTORS))


def named_jobs(scale: Scale, factors=tuple(world.FACTORS)) -> list[dict]:
    """`eval_jobs` with each code's person described in words: every code index gets a fixed random
    person of its concept's gender, the attributes in `factors` named ("a photo of a tanned woman
    with long black hair and glasses in a striped red shirt on the beach"). The base model, no
    mapper, on these prompts is what words alone make of a person, to measure a pseudo-word by."""
    jobs = eval_jobs(scale)
    for j in jobs:
        names = code_person(j["code"], j["concept"]).names()
        person = world.describe(j["concept"], names, None, named=set(factors))
        j["prompt"] = f"a photo of a {person} {world.SCENE_PHRASES[j['scene']][0]}"
    return jobs


# -- metrics -------------------------------------------------------------------------------------


# Kept scores of a mapper are recomputed when the measures change (2: per-factor agreement, pair_div).
METRICS_VERSION = 2


def score(reading: dict, groups: list[list[int]], scenes: list[int]) -> dict:
    """Face Sim, Face Div (eval.py), identity agreement and scene accuracy of judged images, and what
    lies behind them: `agree_<factor>`, the share of a code's image pairs that agree in that one factor
    (which parts of a person a code holds), and `pair_div`, 1 − the mean cosine between images of
    different groups (how different two codes' people are, whether or not each code is consistent;
    Face Div, taken over the groups' mean embeddings, falls with inconsistency as well as with collapse).

    `groups`: image indices per identity (a code, or a dataset person); `scenes`: each image's true scene."""
    emb, factors = reading["embedding"], reading["factors"]
    agreement, per_factor = [], {name: [] for name in judge_lib.IDENTITY}
    for g in groups:
        n = len(g)
        if n < 2:
            continue
        f = factors[g]
        same = f[:, None, :] == f[None, :, :]  # (n, n, 7): which factors two images agree in
        pairs = ~torch.eye(n, dtype=torch.bool)
        agreement.append(same.all(-1)[pairs].float().mean().item())  # all seven agree
        for k, name in enumerate(judge_lib.IDENTITY):
            per_factor[name].append(same[..., k][pairs].float().mean().item())
    label = torch.empty(len(emb), dtype=torch.long)
    for i, g in enumerate(groups):
        label[g] = i
    unit = torch.nn.functional.normalize(emb.double(), dim=1)
    between = label[:, None] != label[None, :]
    return {
        "face_sim": face_similarity([emb[g] for g in groups]),
        "face_div": face_diversity([emb[g] for g in groups]),
        "identity_agreement": float(np.mean(agreement)),
        "scene_accuracy": (reading["scene"] == torch.tensor(scenes)).float().mean().item(),
        **{f"agree_{name}": float(np.mean(v)) for name, v in per_factor.items()},
        "pair_div": 1 - (unit @ unit.T)[between].mean().item(),
    }


def score_generated(images: torch.Tensor, jobs: list[dict], judge: judge_lib.Judge) -> dict:
    reading = judge.read(images)
    keys = sorted({(j["concept"], j["code"]) for j in jobs})
    groups = [[i for i, j in enumerate(jobs) if (j["concept"], j["code"]) == k] for k in keys]
    metrics = score(reading, groups, [world.SCENES.index(j["scene"]) for j in jobs])
    gender = torch.tensor([CONCEPTS.index(j["concept"]) for j in jobs])
    metrics["concept_accuracy"] = (reading["factors"][:, 0] == gender).float().mean().item()
    return metrics


@torch.no_grad()
def factor_footprints(vae: AutoencoderKL, pairs: int = 200, seed: int = 7) -> dict:
    """What L_con can see of each factor: the mean squared distance over every latent element (losses.py's
    l2, reduction "all") between the UNet's latents of two renders of one person in one placement
    that differ in that factor alone; "everything", two random people in one placement, for scale."""
    rng = random.Random(seed)
    everyone = world.draw_identities(int(np.prod([len(v) for v in world.FACTORS.values()])), rng)
    a, b = {f: [] for f in [*world.FACTORS, "everything"]}, {f: [] for f in [*world.FACTORS, "everything"]}
    for _ in range(pairs):
        who, at = rng.choice(everyone), world.draw_placement(rng)
        picture = world.render(who, at)[0]
        for f, values in world.FACTORS.items():
            other = replace(who, **{f: rng.choice([v for v in range(len(values)) if v != getattr(who, f)])})
            a[f].append(picture)
            b[f].append(world.render(other, at)[0])
        a["everything"].append(picture)
        b["everything"].append(world.render(rng.choice(everyone), at)[0])

    def latents(images):
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return base.encode_means(vae, x) * base.SCALING_FACTOR

    return {f: (latents(a[f]) - latents(b[f])).pow(2).mean().item() for f in a}


@torch.no_grad()
def pseudo_word_stats(mapper, codes: list[int], spread_codes: int = 256) -> dict:
    """The codes' CLIP-L pseudo-words, standardised u = (w − μ)/σ by the token table's statistics:
    w_cos, the mean cosine between different codes' u (near 1: the mapper has collapsed every code
    onto one word, near 0: unrelated words); w_rms, the mean root mean square of u (1: a real
    token's spread, what the output LayerNorm pins it to; a plain MLP's words may grow far louder);
    w_dims, the effective number of directions the words of codes 0 … spread_codes−1 vary in
    (1 / losses.word_spread)."""
    head = mapper.heads[0]

    def standardised(cs):
        w_l = mapper(torch.stack([code_to_z(c, mapper.config.z_dim) for c in cs]))[0]
        return (w_l - head.token_mean) / head.token_std

    u = standardised(codes)
    unit = torch.nn.functional.normalize(u, dim=1)
    i, j = torch.triu_indices(len(codes), len(codes), offset=1)
    return {"w_cos": (unit @ unit.T)[i, j].mean().item(), "w_rms": u.pow(2).mean(dim=1).sqrt().mean().item(),
            # ≥ 1, since word_spread ≤ 1; spread_codes = 0: over `codes` (a table of learned words knows no others)
            "w_dims": 1 / word_spread(standardised(range(spread_codes)) if spread_codes else u).item()}


def context_bleed(model: SDXL, mapper, codes: list[int], scenes=world.SCENES) -> dict:
    """How far one word inserted before the concept moves the UNet's context of the words after it.

    For each evaluation prompt ("a photo of a woman on the beach"), the relative change
    |c'_k − c_k| / |c_k| of the context vectors c_k of the concept word, the scene words and the
    EOS, when a word is inserted before the concept (c'_k: the same words, as many positions later
    as the word has tokens), averaged over words and prompts. Three references: a real world word
    the captions put there (the skin words), a pseudo-word of the trained mapper, and, for scale,
    changing the scene itself (the same positions, a different scene phrase of as many tokens)."""
    def shift(prompt):
        """The plain prompt's context (L, D) and the positions from its concept word to its EOS."""
        ids = model.tok_l([prompt])[0].tolist()
        i, n = ids.index(model.tok_l.encode("woman")[0]), ids.index(EOS_ID)
        return model.encode_prompt([prompt])[0][0], list(range(i, n + 1))

    def rel(c_new, c_old, old_positions, offset):
        new = c_new[[k + offset for k in old_positions]]
        return ((new - c_old[old_positions]).norm(dim=-1) / c_old[old_positions].norm(dim=-1)).mean().item()

    real, pseudo, scene = [], [], []
    for s, sc in enumerate(scenes):
        prompt = world.prompt("woman", sc)
        c, after = shift(prompt)
        for word in world.SKIN_WORDS.values():
            real.append(rel(shift(prompt.replace("woman", f"{word} woman"))[0], c, after, len(model.tok_l.encode(word))))
        for code in codes:
            w_l, w_g = mapper(code_to_z(code, mapper.config.z_dim)[None])
            pseudo.append(rel(model.encode_prompt([prompt], [(w_l[0], w_g[0], "woman")])[0][0], c, after, 1))
        other = world.prompt("woman", scenes[(s + 1) % len(scenes)])
        c_other, after_other = shift(other)
        if len(after_other) == len(after):  # the same positions hold the other scene's words
            scene.append(rel(c_other, c, after, 0))
    return {"real_word": float(np.mean(real)), "pseudo_word": float(np.mean(pseudo)), "other_scene": float(np.mean(scene))}


# -- figures -------------------------------------------------------------------------------------


def contact_sheet(images: torch.Tensor, jobs: list[dict], path: str, codes: int = 4, title: str = "") -> None:
    """Rows = codes (man codes, then woman codes), columns = scenes (first seed), 2x size, labelled."""
    scenes = list(dict.fromkeys(j["scene"] for j in jobs))
    keys = list(dict.fromkeys((j["concept"], j["code"]) for j in jobs))
    keys = [k for c in CONCEPTS for k in [k for k in keys if k[0] == c][:codes]]
    S, left, top = 2 * world.SIZE, 110, 34
    sheet = Image.new("RGB", (left + S * len(scenes), top + S * len(keys)), "white")
    d = ImageDraw.Draw(sheet)
    d.text((4, 2), title, fill="black")
    for col, scene in enumerate(scenes):
        d.text((left + col * S + 4, top - 14), scene, fill="black")
    for row, (concept, code) in enumerate(keys):
        d.text((4, top + row * S + S // 2 - 6), f"{concept} code {code}", fill="black")
        for col, scene in enumerate(scenes):
            i = next(i for i, j in enumerate(jobs) if (j["concept"], j["code"], j["scene"]) == (concept, code, scene))
            tile = Image.fromarray(images[i].permute(1, 2, 0).numpy()).resize((S, S), Image.NEAREST)
            sheet.paste(tile, (left + col * S, top + row * S))
    sheet.save(path)


def line_plot(series: dict[str, list[tuple[float, float]]], path: str, title: str, ylabel: str) -> None:
    """A small PNG line plot (PIL only): one polyline per named series of (x, y) points."""
    W, H, m = 520, 300, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = [p for s in series.values() for p in s]
    if not pts:
        return
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

    def at(x, y):
        return m + (x - x0) / (x1 - x0) * (W - 2 * m), H - m - (y - y0) / (y1 - y0) * (H - 2 * m)

    d.rectangle([m, m, W - m, H - m], outline="black")
    d.text((m, 10), title, fill="black")
    d.text((4, m - 14), f"{ylabel}: {y1:.4g}", fill="black")
    d.text((4, H - m), f"{y0:.4g}", fill="black")
    d.text((m, H - m + 6), f"step {x0:g}", fill="black")
    d.text((W - m - 60, H - m + 6), f"step {x1:g}", fill="black")
    colours = ["blue", "red", "green", "orange", "purple", "black"]
    for k, (name, s) in enumerate(series.items()):
        c = colours[k % len(colours)]
        if len(s) > 1:
            d.line([at(x, y) for x, y in s], fill=c, width=2)
        d.text((W - m - 150, m + 6 + 14 * k), name, fill=c)
    img.save(path)


# -- the steps -----------------------------------------------------------------------------------


def file_digest(path: str) -> str:
    """SHA-256 of a file: what a cached step that reads it is keyed by (a retrained file is a new file)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Experiment:
    """The steps, each cached in `work` under its settings: a rerun skips what exists, a changed setting redoes
    exactly the steps that depend on it. `base_config` picks one of the experiment's base models (default: the
    scale's); its files are named by what sets them apart (`base-seed0.safetensors`, `vae-seed0.safetensors`)."""

    def __init__(self, scale: Scale, work: str, figures: str, log=print, base_config: base.BaseConfig | None = None):
        self.scale, self.work, self.figures, self.log = scale, work, figures, log
        self.base_cfg = base_config or scale.base_config
        os.makedirs(work, exist_ok=True)
        os.makedirs(figures, exist_ok=True)
        self.data = os.path.join(work, "data")
        # The mapper's CelebA: the unnamed people as small non-square files (world.export), or the world itself.
        w = scale.world_config
        self.mapper_data = os.path.join(work, "data-mapper") if (w.named or w.mapper_original[0]) else self.data
        cfg = self.base_cfg
        self.tag = f"seed{cfg.seed}" + (f"-ch{cfg.model_channels}" if cfg.model_channels != base.UNET.model_channels else "")
        self.weights = os.path.join(work, f"base-{self.tag}.safetensors")
        self.vae_path = os.path.join(work, f"vae-seed{cfg.seed}.safetensors")
        self.judge_path = os.path.join(work, f"judge-seed{cfg.seed}.pt")

    def _cached(self, name: str, config: dict) -> dict | None:
        """The facts of a finished step whose config matches, else None."""
        path = os.path.join(self.work, f"{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                done = json.load(f)
            # (compared as JSON keeps it: a tuple comes back a list)
            if done.get("config") == json.loads(json.dumps(config)):
                return done
        return None

    def _done(self, name: str, config: dict, facts: dict) -> dict:
        facts = {**facts, "config": config}
        with open(os.path.join(self.work, f"{name}.json.tmp"), "w") as f:
            json.dump(facts, f, indent=1)
        os.replace(os.path.join(self.work, f"{name}.json.tmp"), os.path.join(self.work, f"{name}.json"))
        return facts

    def make_world(self) -> dict:
        config = asdict(self.scale.world_config)
        folders = list(dict.fromkeys([self.data, self.mapper_data]))
        if (done := self._cached("world", config)) and all(os.path.isdir(f) for f in folders):
            return done
        t0 = time.time()
        for folder in folders:
            if os.path.isdir(folder):
                shutil.rmtree(folder)
        mapper_out = self.mapper_data if self.mapper_data != self.data else None
        facts = world.export(self.data, self.scale.world_config, mapper_out)
        self.log(f"world: {facts['images']} images of {facts['identities']} people in {time.time() - t0:.0f} s")
        return self._done("world", config, {**facts, "seconds": round(time.time() - t0)})

    def vae_config(self) -> dict:
        return {"world": asdict(self.scale.world_config), "vae": self.base_cfg.vae_part()}

    def base_config(self) -> dict:
        return {"world": asdict(self.scale.world_config), "base": asdict(self.base_cfg)}

    def make_vae(self) -> tuple[AutoencoderKL, dict]:
        """The trained VAE, its own step: a changed UNet or text setting keeps it (and the judge)."""
        name = os.path.basename(self.vae_path).split(".")[0]
        if (done := self._cached(name, self.vae_config())) and os.path.isfile(self.vae_path):
            vae = AutoencoderKL(base.VAE)
            vae.load_state_dict(load_file(self.vae_path))
            return vae.eval(), done
        vae, facts = base.make_vae(self.data, self.base_cfg, self.log,
                                   figure=os.path.join(self.figures, f"vae_reconstructions_seed{self.base_cfg.seed}.png"))
        save_file(vae.state_dict(), self.vae_path + ".tmp")
        os.replace(self.vae_path + ".tmp", self.vae_path)
        facts.update(threads=torch.get_num_threads(), torch=torch.__version__)
        return vae, self._done(name, self.vae_config(), facts)

    def make_base(self) -> dict:
        vae, vae_facts = self.make_vae()
        name = f"base-{self.tag}"
        config = {**self.base_config(), "vae_sha256": file_digest(self.vae_path)}
        if (done := self._cached(name, config)) and os.path.isfile(self.weights):
            return {**vae_facts, **done}
        facts = base.train_base(self.data, self.weights, vae, self.base_cfg, self.log, self.scale.world_config.name_rate)
        return {**vae_facts, **self._done(name, config, facts)}

    def load_model(self) -> SDXL:
        return SDXL.load(self.weights)  # the project's own loader, as sample.py and train.py load it

    def make_judge(self, model: SDXL) -> tuple[judge_lib.Judge, dict]:
        # The judge sees images through the VAE only, so it depends on the VAE step, not on the UNet.
        config = {"vae": self.vae_config(), "images": self.scale.judge_images, "steps": self.scale.judge_steps,
                  "vae_sha256": file_digest(self.vae_path)}
        name = os.path.basename(self.judge_path).split(".")[0]
        judge = judge_lib.Judge()
        if (done := self._cached(name, config)) and os.path.isfile(self.judge_path):
            judge.load_state_dict(torch.load(self.judge_path, weights_only=True))
            return judge.eval(), done
        t0 = time.time()
        n = self.scale.judge_images
        images, labels = judge_lib.render_set(n, seed=1)
        held_images, held_labels = judge_lib.render_set(max(16, n // 6), seed=2)
        rec, held_rec = self.round_trip(model, images), self.round_trip(model, held_images)
        judge = judge_lib.train_judge(torch.cat([images, rec]), torch.cat([labels, labels]), self.scale.judge_steps, log=self.log)
        torch.save(judge.state_dict(), self.judge_path)
        facts = {"held_out_rendered": judge_lib.accuracy(judge, held_images, held_labels),
                 "held_out_through_vae": judge_lib.accuracy(judge, held_rec, held_labels),
                 "seconds": round(time.time() - t0)}
        self.log(f"judge: held-out accuracy {facts['held_out_rendered']['person']:.3f} (all seven factors, rendered), "
                 f"{facts['held_out_through_vae']['person']:.3f} (through the VAE)")
        return judge, self._done(name, config, facts)

    def footprints(self, model: SDXL) -> dict:
        """`factor_footprints` through this world's VAE, kept beside it."""
        config = {"vae": self.vae_config(), "pairs": self.scale.footprint_pairs,
                  "vae_mtime": os.path.getmtime(os.path.join(self.work, "vae.safetensors"))}
        if done := self._cached("footprints", config):
            return done["latent_l2"]
        return self._done("footprints", config, {"latent_l2": factor_footprints(model.vae, self.scale.footprint_pairs)})["latent_l2"]

    @torch.no_grad()
    def round_trip(self, model: SDXL, images: torch.Tensor) -> torch.Tensor:
        """Images through the toy VAE and back (what a generated image looks like at best)."""
        out = []
        for i in range(0, len(images), 128):
            z = model.vae.encode(base.to_unit(images[i : i + 128])).mode()
            out.append(torch.from_numpy(model.decode(z * base.SCALING_FACTOR)).permute(0, 3, 1, 2))
        return torch.cat(out)

    def dataset_rows(self, judge: judge_lib.Judge, model: SDXL) -> tuple[dict, dict]:
        """The dataset's own scores, of its images as they are and after `model`'s VAE round trip (the
        best a generated image of the toy SDXL can look), read by the same judge."""
        images, names, truth = base.load_world(self.data)
        by_person: dict[int, list[int]] = {}
        for i, t in enumerate(truth):
            by_person.setdefault(t["identity"], []).append(i)
        scenes = [world.SCENES.index(t["scene"]) for t in truth]
        return tuple(score(judge.read(x), list(by_person.values()), scenes) for x in (images, self.round_trip(model, images)))

    def base_quality(self, model: SDXL, judge: judge_lib.Judge) -> dict:
        """Does a named attribute appear? One prompt per (factor, value, concept, seed), read by the judge."""
        jobs, wanted = [], []
        for f, values in world.FACTORS.items():
            if f == "gender":
                continue
            for v, value in enumerate(values):
                if (f, value) in (("glasses", "no"),):
                    continue  # captions never say "without glasses"
                names = {k: vals[0] for k, vals in world.FACTORS.items()} | {f: value}
                for c, concept in enumerate(CONCEPTS):
                    for r in range(self.scale.seeds):
                        phrase = world.describe(concept, names, None, named={f})
                        jobs.append({"prompt": f"a photo of a {phrase} {world.SCENE_PHRASES['beach'][0]}",
                                     "seed": 7_000_000 + 100 * len(jobs) + r, "concept": concept})
                        wanted.append((list(world.FACTORS).index(f), v))
        images = generate(model, jobs, steps=self.scale.steps, guidance=self.scale.guidance)
        factors = judge.read(images)["factors"]
        hit = [factors[i, f].item() == v for i, (f, v) in enumerate(wanted)]
        per_factor = {}
        for (f, v), h in zip(wanted, hit):
            per_factor.setdefault(list(world.FACTORS)[f], []).append(h)
        chance = {f: 1 / len(world.FACTORS[f]) for f in per_factor}
        contact = os.path.join(self.figures, "base_named_attributes.png")
        tiles = images[: 16 * (len(images) // 16)][:32]
        if len(tiles):
            grid = tiles.reshape(-1, 8, 3, 64, 64).permute(0, 3, 1, 4, 2).reshape(-1, 8 * 64, 3)
            Image.fromarray(grid.numpy()).resize((2 * 8 * 64, 2 * grid.shape[0]), Image.NEAREST).save(contact)
        return {"named_attribute_accuracy": float(np.mean(hit)),
                "per_factor": {f: float(np.mean(h)) for f, h in per_factor.items()},
                "chance": chance, "prompts": len(jobs)}

    # -- mapper rows -----------------------------------------------------------------------------

    def train_row(self, row: Row, seed: int, threads: int = 0) -> str:
        """Train (or reuse) one mapper with train.py (on `threads` CPU threads, 0: PyTorch's choice);
        returns its run folder."""
        s = self.scale
        run = os.path.join(self.work, "runs", _slug(row.name) + f"-seed{seed}")
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", self.data, "--weights", self.weights,
               "--out", run, "--cache-dir", os.path.join(self.work, "latents"), "--resolution", str(world.SIZE),
               "--steps", str(s.mapper_steps), "--batch-size", str(s.mapper_batch), "--lr", str(s.mapper_lr),
               "--checkpoint-every", str(s.checkpoint_every), "--sample-every", "0", "--num-workers", "0",
               "--device", "cpu", "--seed", str(seed), *row.flags]
        done = os.path.join(run, "done.json")
        identity = self.run_identity(cmd[2:])
        # A finished run with the same resolved settings (under any row name) is this row's run.
        for other in sorted(glob.glob(os.path.join(self.work, "runs", "*", "done.json"))):
            with open(other) as f:
                if {**BEFORE_FLAG, **json.load(f).get("identity", {})} == identity:
                    return os.path.dirname(other)
        if os.path.isfile(done):
            shutil.rmtree(run)
        resume = ["--resume"] if os.path.isfile(os.path.join(run, "state.pt")) else []
        self.log(f"training {row.name} (seed {seed}): {' '.join(cmd[1:])}")
        t0 = time.time()
        snapshots = os.path.join(run, "snapshots")
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_checkpoints, args=(run, snapshots, stop), daemon=True)
        watcher.start()
        try:
            env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
            proc = subprocess.run(cmd + resume, cwd=ROOT, capture_output=True, text=True, env=env)
        finally:
            stop.set()
            watcher.join()
        if proc.returncode != 0:
            raise RuntimeError(f"train.py failed for {row.name}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        _snapshot(run, snapshots)
        with open(done, "w") as f:
            json.dump({"command": cmd[1:], "identity": identity, "seconds": round(time.time() - t0)}, f)
        return run

    def run_identity(self, train_args: list[str]) -> dict:
        """What a train.py run computes: its resolved settings (`run_identity`) and the base model it
        trains through (the same --weights path holds another model once the base is retrained)."""
        return {**run_identity(train_args), "base": self.base_config()}

    def eval_row(self, model: SDXL, judge: judge_lib.Judge, mapper_path: str | None, figure: str | None = None,
                 title: str = "", offset: int = 0, jobs: list[dict] | None = None) -> dict:
        jobs = jobs or eval_jobs(self.scale, offset)
        # A mapper's scores are kept beside it, valid while the mapper, the judge and the sampling
        # settings stay the same: a rerun that adds a row does not redraw the others.
        mapper = load_mapper(mapper_path) if mapper_path else None
        metrics = None
        cache, key = None, None
        if mapper_path and not figure:
            s = self.scale
            key = {"mapper": os.path.getmtime(mapper_path), "judge": os.path.getmtime(os.path.join(self.work, "judge.pt")),
                   "jobs": jobs, "steps": s.steps, "guidance": s.guidance,
                   "measures": METRICS_VERSION}
            cache = mapper_path + ".metrics.json"
            if os.path.isfile(cache):
                with open(cache) as f:
                    kept = json.load(f)
                if kept["key"] == key:
                    metrics = kept["metrics"]
        if metrics is None:
            images = generate(model, jobs, mapper, self.scale.steps, self.scale.guidance)
            if figure:
                contact_sheet(images, jobs, figure, title=title)
            metrics = score_generated(images, jobs, judge)
            if cache:
                with open(cache + ".tmp", "w") as f:
                    json.dump({"key": key, "metrics": metrics}, f)
                os.replace(cache + ".tmp", cache)
        if mapper is not None:  # the words themselves: cheap, so never cached
            metrics = {**metrics, **pseudo_word_stats(mapper, sorted({j["code"] for j in jobs}))}
        return metrics

    def inverted_row(self, model: SDXL, judge: judge_lib.Judge, family: str, figure: str | None = None) -> dict:
        """The evaluation with each code's pseudo-word replaced by a word learned for its person
        (toyworld/inversion.py): what one word of `family` can hold, an upper bound for a mapper."""
        s = self.scale
        jobs = eval_jobs(s)
        keys = sorted({(j["concept"], j["code"]) for j in jobs})
        heads = inversion.token_stats(model)
        path = os.path.join(self.work, f"inversion-{family}.pt")
        # (the keys as lists, as the JSON file keeps them)
        config = {"base": self.base_config(), "keys": [list(k) for k in keys], "family": family, "steps": s.inversion_steps,
                  "images": s.inversion_images, "lr": s.inversion_lr, "base_mtime": os.path.getmtime(self.weights)}
        done = self._cached(f"inversion-{family}", config)
        if done and os.path.isfile(path):
            words = torch.load(path, weights_only=True)
        else:
            t0 = time.time()
            words = [inversion.invert(model, code_person(code, concept), concept, heads, family,
                                      steps=s.inversion_steps, images=s.inversion_images, lr=s.inversion_lr, seed=code)
                     for concept, code in keys]
            torch.save(words, path)
            done = self._done(f"inversion-{family}", config, {"seconds": round(time.time() - t0)})
            self.log(f"textual inversion ({family}): {len(keys)} people in {done['seconds']} s")
        table = inversion.WordTable([code for _, code in keys], words, heads)
        images = generate(model, jobs, table, s.steps, s.guidance)
        if figure:
            contact_sheet(images, jobs, figure, title=f"one learned word per person ({family})")
        return {**score_generated(images, jobs, judge), **pseudo_word_stats(table, [code for _, code in keys], 0),
                "seconds": done["seconds"]}

    def curve(self, model: SDXL, judge: judge_lib.Judge, run: str) -> list[dict]:
        """Face Sim and Face Div of every checkpoint snapshot of a run (the curve over training)."""
        folder = os.path.join(run, "snapshots")
        points = []
        names = [n for n in os.listdir(folder) if n.endswith(".safetensors")]  # not the scores kept beside them
        for name in sorted(names, key=lambda n: int(n.split("_")[1].split(".")[0])):
            step = int(name.split("_")[1].split(".")[0])
            m = self.eval_row(model, judge, os.path.join(folder, name))
            points.append({"step": step, **m})
        return points


# train.py flags added after runs were recorded, with the value those runs computed with (a flag's
# first default reproduces what train.py did before it existed).
BEFORE_FLAG = {"mapper_gain": 1.0, "lambda_spread": 0.0}


def run_identity(train_args: list[str]) -> dict:
    """What a train.py run computes: its arguments with train.py's defaults filled in, less where it
    writes. A changed default changes the identity of the rows that rely on it (they retrain); the
    same settings spelled differently ("--gamma 0.001" or that default) are one run."""
    import train  # only its argument parser and defaults

    resolved = vars(train.parse_args(train_args))
    for key, value in train.METHOD_DEFAULTS.items():
        if resolved[key] is None:
            resolved[key] = value
    for key in ("out", "cache_dir", "resume", "num_workers", "checkpoint_every"):
        resolved.pop(key)
    return resolved


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-").replace("--", "-")


def _snapshot(run: str, snapshots: str) -> None:
    """Copy the run's mapper.safetensors, named by the step stored in it, if not copied yet."""
    path = os.path.join(run, "mapper.safetensors")
    if not os.path.isfile(path):
        return
    try:
        with safe_open(path, "pt") as f:
            step = int(f.metadata()["step"])
    except Exception:
        return  # being replaced right now: the next poll gets it
    os.makedirs(snapshots, exist_ok=True)
    target = os.path.join(snapshots, f"step_{step:06d}.safetensors")
    if not os.path.exists(target):
        shutil.copyfile(path, target + ".tmp")
        os.replace(target + ".tmp", target)


def _watch_checkpoints(run: str, snapshots: str, stop: threading.Event) -> None:
    # train.py replaces mapper.safetensors atomically at each checkpoint; keep every one of them.
    while not stop.wait(0.1):
        _snapshot(run, snapshots)


# -- the report ----------------------------------------------------------------------------------


def _mean_std(rows: list[dict], key: str) -> tuple[float, float]:
    v = np.array([r[key] for r in rows], dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def verdicts(dataset: dict, base_rows: list[dict], full_rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The issue's definition of "working", each criterion with its numbers."""
    fs, fs_sd = _mean_std(full_rows, "face_sim")
    bs, bs_sd = _mean_std(base_rows, "face_sim")
    spread = max(fs_sd, bs_sd)
    ia, _ = _mean_std(full_rows, "identity_agreement")
    fd, _ = _mean_std(full_rows, "face_div")
    sa, _ = _mean_std(full_rows, "scene_accuracy")
    sb, _ = _mean_std(base_rows, "scene_accuracy")
    return [
        (f"identity agreement ≥ 0.8 x the dataset's ({0.8 * dataset['identity_agreement']:.3f})",
         ia >= 0.8 * dataset["identity_agreement"], f"{ia:.3f}"),
        (f"Face Sim above the base model's by more than 10 x the spread over seeds (10 x {spread:.4f})"
         if len(full_rows) > 1 else "Face Sim above the base model's (one seed: the spread over seeds is not measured)",
         fs - bs > 10 * spread, f"{fs:.3f} vs {bs:.3f}"),
        (f"Face Div ≥ 0.9 x the dataset's ({0.9 * dataset['face_div']:.3f})", fd >= 0.9 * dataset["face_div"], f"{fd:.3f}"),
        ("scene accuracy within 5 points of the base model's", abs(sa - sb) <= 0.05, f"{sa:.3f} vs {sb:.3f}"),
    ]


def _table(rows: list[tuple[str, dict]], paper: bool = False) -> list[str]:
    head = ("| row | Face Sim | Face Div | identity agreement | scene accuracy | concept accuracy | pseudo-word cos | word RMS | word dims |"
            + (" paper Face Sim / Div |" if paper else ""))
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, m in rows:
        def cell(k):
            if k not in m:
                return "–"
            return f"{m[k]:.3f} ± {m[k + '_sd']:.3f}" if k + "_sd" in m else f"{m[k]:.3f}"
        line = f"| {name} | {cell('face_sim')} | {cell('face_div')} | {cell('identity_agreement')} | {cell('scene_accuracy')} | {cell('concept_accuracy')} | {cell('w_cos')} | {cell('w_rms')} | {cell('w_dims')} |"
        if paper:
            line += f" {m['paper'][0]:.3f} / {m['paper'][1]:.3f} |" if m.get("paper") else " – |"
        out.append(line)
    return out


INVERTED = {"layernorm": "a word the default mapper could give: μ + σ⊙LayerNorm(v)", "free": "any word: μ + σ⊙v"}


# Ablation rows that also go into the factor table (the start of their names).
FACTOR_ROWS = ("Mapper without output LayerNorm", "Mapper output gain 100", "Distance L1", "Word spread")


def _factor_table(f: dict) -> list[str]:
    """Which parts of a person each row holds: per factor, the share of a code's image pairs that agree."""
    names = list(judge_lib.IDENTITY)
    fp = f["footprints"]
    out = ["### What a code holds, factor by factor", "",
           "Per factor, the share of a code's image pairs (a person's, in the dataset rows) whose judged value "
           "agrees; the base model's row is what chance agreement looks like here. The first line is what "
           "L_con can see of each factor: the mean squared latent distance between two renders that differ "
           f"in that factor alone (two random people: {fp['everything']:.3f}). Pair div is 1 − the mean cosine "
           "between images of different codes: how different two codes' people are, consistent or not.", "",
           "| row | " + " | ".join(names) + " | pair div | word dims |", "|" + "---|" * (len(names) + 3),
           "| latent footprint (l2) | " + " | ".join(f"{fp[n]:.3f}" for n in names) + " | – | – |"]
    rows = [("Dataset", f["dataset"]), ("Dataset through the VAE", f.get("dataset_vae") or {}),
            ("Base model, no code", f["base"]),
            *[(f"Base model, {k} attributes in words", m) for k, m in f.get("named", {}).items()],
            *[(f"One learned word per person ({k})", m) for k, m in f.get("inverted", {}).items()],
            ("CoCoIns (full)", f["full"]),
            *[(r["name"], r) for r in f.get("ablations", []) if r["name"].startswith(FACTOR_ROWS)]]
    for name, m in rows:
        if f"agree_{names[0]}" not in m:
            continue
        cell = lambda k: f"{m[k]:.2f}" if k in m else "–"  # noqa: E731
        out.append(f"| {name} | " + " | ".join(cell(f"agree_{n}") for n in names) + f" | {cell('pair_div')} | {cell('w_dims')} |")
    return out


def _aggregate(rows: list[dict]) -> dict:
    out = {}
    for k in rows[0]:
        out[k], out[k + "_sd"] = _mean_std(rows, k)
    return out


def direction(row: dict, full: dict, paper_row: tuple[float, float] | None, spread: dict | None = None) -> str:
    """Does the toy world agree with the paper that the full method beats this ablation, per metric?

    `spread`: the full method's standard deviation over mapper seeds per metric; a difference
    under twice that is no evidence either way ("undecided")."""
    if not paper_row:
        return ""
    words = []
    for k, i, label in (("face_sim", 0, "Face Sim"), ("face_div", 1, "Face Div")):
        paper_says = PAPER_FULL[i] > paper_row[i]
        toy_says = full[k] > row[k]
        verdict = "agrees" if paper_says == toy_says else "DISAGREES"
        if spread and abs(full[k] - row[k]) < 2 * spread.get(k, 0.0):
            verdict = f"undecided (|Δ| {abs(full[k] - row[k]):.3f} < 2 x the seeds' spread {spread[k]:.3f})"
        words.append(f"{label}: paper {'full > ablation' if paper_says else 'ablation ≥ full'}, "
                     f"toy {'full > ablation' if toy_says else 'ablation ≥ full'} → {verdict}")
    return "; ".join(words)


def write_results(path: str, command: str, scale_name: str, facts: dict) -> None:
    rel = lambda p: os.path.relpath(p, os.path.dirname(path))  # noqa: E731
    f, L = facts, []
    L += ["# Toy-world results", "",
          "Made by one command (`toyworld/experiment.py`; the numbers and figures below are its output, "
          "rerunning it reproduces them):", "", f"    {command}", "",
          f"Scale `{scale_name}`; {f['world']['images']} images of {f['world']['identities']} people; "
          f"wall time {f['seconds'] / 60:.0f} min on {f['machine']}" + (
              "; the steps when they ran: " + ", ".join(f"{k} {v:.0f} min" for k, v in f["step_minutes"].items())
              if f.get("step_minutes") else "") + ".", ""]
    if os.path.isfile(os.path.join(os.path.dirname(path), "FINDINGS.md")):
        with open(os.path.join(os.path.dirname(path), "FINDINGS.md")) as fh:
            L += [fh.read().strip(), ""]
    L += ["## Is CoCoIns working here?", "", "| criterion | met | value |", "|---|---|---|"]
    L += [f"| {c} | {'yes' if ok else '**no**'} | {v} |" for c, ok, v in f["verdicts"]]
    L += ["", "## Main table", "",
          "Face Sim and Face Div are eval.py's, on the judge's embedding (the seven factors' probabilities); "
          "identity agreement is the share of a code's image pairs whose seven judged factors all agree; "
          "scene accuracy is the share of images whose judged scene is the prompt's (the toy CLIP-T); concept "
          "accuracy, the share whose judged gender is the prompt's man/woman; pseudo-word cos, the mean cosine between "
          "different codes' standardised CLIP-L pseudo-words (1: every code the same word); word RMS, their root mean square in units of the token table's spread (1: as loud as a real token); word dims, the effective number of directions the codes' words vary in (over codes 0-255; for the learned words, over the evaluated people"
          + (f"; an untrained mapper's: {f['untrained']['w_dims']:.1f}" if f.get("untrained") else "") + "). ± is the standard deviation over "
          f"{f['mapper_seeds']} seeds (mapper seeds for CoCoIns, sampling seeds for the base model).", ""]
    L += _table([("Dataset (same person = same identity label)", f["dataset"]),
                 *([("Dataset through the VAE (the best a generated image can look)", f["dataset_vae"])]
                   if f.get("dataset_vae") else []),
                 ("Base model, no code (grouped by index)", f["base"]),
                 *[(f"Base model, no code, each code's person in words: {k} attributes named", m)
                   for k, m in f.get("named", {}).items()],
                 *[(f"One word learned per person (textual inversion, {INVERTED[k]})", m) for k, m in f.get("inverted", {}).items()],
                 ("CoCoIns (full)", f["full"])]) + [""]
    if f.get("footprints"):
        L += _factor_table(f) + [""]
    if f.get("bleed"):
        b = f["bleed"]
        L += ["How far a word inserted before the concept moves the context of the words after it (the concept, "
              "the scene words, EOS; relative change of their context vectors, mean over the evaluation prompts): "
              f"a real skin word {b['real_word']:.3f}, a trained pseudo-word (full CoCoIns, seed 0) {b['pseudo_word']:.3f}; "
              f"for scale, swapping the scene phrase itself moves them {b['other_scene']:.3f}.", ""]
    if f.get("ablations"):
        L += ["", "## Ablations (one mapper seed each), against the paper's Tables 3-5 (Portraits)", ""]
        for table, title in (("table3", "Table 3: the consistency loss"), ("table4", "Table 4: mask and background"),
                             ("table5", "Table 5: how the positive is made"), ("choices", "Open choices")):
            rows = [(r["name"], r) for r in f["ablations"] if r["table"] == table]
            if not rows:
                continue
            L += [f"### {title}", ""]
            full = [("CoCoIns (full, seed 0)", {**f["full_seed0"], "paper": PAPER_FULL if table != "choices" else None})]
            if table == "choices" and f.get("mapper_seeds", 1) > 1:
                full.append((f"CoCoIns (full, {f['mapper_seeds']} seeds)", f["full"]))
            L += _table(rows + full, paper=table != "choices")
            spread = {k: f["full"][k + "_sd"] for k in ("face_sim", "face_div")} if f.get("mapper_seeds", 1) > 1 else None
            L += [""] + [f"- {name}: {direction(r, f['full_seed0'], r.get('paper'), spread)}" for name, r in rows if r.get("paper")] + [""]
    L += ["## The base model", "",
          f"- Parameters: {', '.join(f'{k} {v / 1e6:.2f} M' for k, v in f['base_facts']['parameters'].items())}.",
          f"- Training: VAE {f['base_facts']['vae_seconds'] / 60:.1f} min (L1 {f['base_facts']['vae_l1_64px']:.3f} on [-1, 1]), "
          f"UNet {f['base_facts']['unet_seconds'] / 60:.1f} min.",
          f"- Named attributes appear: {f['quality']['named_attribute_accuracy']:.3f} of {f['quality']['prompts']} prompts naming one "
          "attribute show it (per factor: " + ", ".join(f"{k} {v:.2f} (chance {f['quality']['chance'][k]:.2f})"
                                                        for k, v in f["quality"]["per_factor"].items()) + ").",
          f"- Scenes: scene accuracy {f['base']['scene_accuracy']:.3f} without codes (dataset {f['dataset']['scene_accuracy']:.3f}).",
          f"- Identities vary when no attribute is named: Face Div {f['base']['face_div']:.3f} across random groups "
          f"(dataset across people: {f['dataset']['face_div']:.3f}).", "",
          "## The judge", "",
          "Held-out accuracy on rendered images of random people (all seven factors right / per head):", ""]
    for label, key in (("rendered", "held_out_rendered"), ("through the VAE", "held_out_through_vae")):
        acc = f["judge"][key]
        L += [f"- {label}: person {acc['person']:.3f}; " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "person")]
    L += ["", "## Figures", ""]
    for title, name in (("Base model, no code: rows are code indices (random people), columns scenes", "contact_base.png"),
                        ("CoCoIns: rows are codes, columns scenes", "contact_cocoins.png"),
                        ("Base model, each code's person named in full in the prompt", "contact_named.png"),
                        ("One word learned per person (textual inversion, LayerNorm family) in each code's place", "contact_inverted_layernorm.png"),
                        ("CoCoIns at γ = 1e-4, the default while the text encoders were frozen", "contact_cocoins_gamma_1e-4.png"),
                        ("Loss terms over training (full CoCoIns, seed 0)", "curve_loss.png"),
                        ("Face Sim and Face Div over training (full CoCoIns, seed 0)", "curve_face_sim.png"),
                        ("VAE: images (top) and reconstructions (bottom)", "vae_reconstructions.png"),
                        ("Base model, one named attribute per prompt", "base_named_attributes.png")):
        if os.path.isfile(os.path.join(f["figures"], name)):  # the γ = 1e-4 sheet comes with the ablations
            L += [f"**{title}**", "", f"![{title}]({rel(os.path.join(f['figures'], name))})", ""]
    L += ["## Raw numbers", "", "```json", json.dumps({k: v for k, v in f.items() if k != "verdicts"}, indent=1, default=str), "```", ""]
    with open(path + ".tmp", "w") as fh:
        fh.write("\n".join(L))
    os.replace(path + ".tmp", path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m toyworld", description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="full", choices=sorted(SCALES), help="full: the experiment; smoke: the plumbing in a minute")
    p.add_argument("--rows", default="all", choices=["all", "core"], help="core: dataset, base model and full CoCoIns over seeds; all: plus every ablation")
    p.add_argument("--work", default=os.path.join(ROOT, "toyworld", "cache"), help="where the world, the models and the runs are kept (rerun skips what exists)")
    p.add_argument("--results", default=os.path.join(ROOT, "toyworld", "RESULTS.md"), help="the report to write")
    p.add_argument("--figures", default=None, help="folder for the figures (default: figures/ beside --results)")
    p.add_argument("--mapper-seeds", type=int, default=0, help="seeds of the base-model and full-CoCoIns rows (0: the scale's, 3 at full scale)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's choice)")
    p.add_argument("--jobs", type=int, default=1, help="mapper runs trained side by side, the threads shared among them (2 on a 2-core machine is faster than 1)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    if args.mapper_seeds:
        scale = replace(scale, mapper_seeds=args.mapper_seeds)
    figures = args.figures or os.path.join(os.path.dirname(os.path.abspath(args.results)), "figures")
    exp = Experiment(scale, args.work, figures)
    t0 = time.time()
    facts = {"world": exp.make_world(), "base_facts": exp.make_base()}
    model = exp.load_model()
    def train_side_by_side(pairs):
        # `jobs` train.py processes at a time, the threads shared among them: the toy UNet's small
        # convolutions keep two threads of one process far from twice one thread's speed, so two
        # one-thread runs side by side finish sooner. The loops below then find these runs done.
        if args.jobs > 1:
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(lambda pair: exp.train_row(*pair, threads=max(1, torch.get_num_threads() // args.jobs)), pairs))

    train_side_by_side([(FULL, seed) for seed in range(scale.mapper_seeds)])
    judge, facts["judge"] = exp.make_judge(model)
    facts["footprints"] = exp.footprints(model)
    facts["dataset"], facts["dataset_vae"] = exp.dataset_rows(judge, model)
    facts["quality"] = exp.base_quality(model, judge)
    exp.log("evaluating the base model without codes")
    base_rows = [exp.eval_row(model, judge, None, os.path.join(figures, "contact_base.png") if s == 0 else None,
                              "base model, no code", offset=s) for s in range(scale.mapper_seeds)]
    exp.log("evaluating the base model with each code's person named in words")
    facts["named"] = {k: exp.eval_row(model, judge, None, os.path.join(figures, "contact_named.png") if k == "all 7" else None,
                                      "base model, the person named in full", jobs=named_jobs(scale, factors))
                      for k, factors in NAMED.items()}
    full_rows, runs = [], []  # runs: every mapper run the report uses, the full method's seeds first
    for seed in range(scale.mapper_seeds):
        run = exp.train_row(FULL, seed)
        runs.append(run)
        full_rows.append(exp.eval_row(model, judge, os.path.join(run, "mapper.safetensors"),
                                      os.path.join(figures, "contact_cocoins.png") if seed == 0 else None, "CoCoIns"))
    facts.update(base=_aggregate(base_rows), full=_aggregate(full_rows), full_seed0=full_rows[0],
                 base_rows=base_rows, full_rows=full_rows, mapper_seeds=scale.mapper_seeds)
    facts["verdicts"] = verdicts(facts["dataset"], base_rows, full_rows)
    # For scale: the word dims of an untrained mapper (train.py's initialisation, seed 0).
    torch.manual_seed(0)
    import train  # its token statistics, as new_mapper computes them

    fresh = Mapper(MapperConfig(token_widths=(model.clip_l.config.width, model.clip_g.config.width)), train.token_stats(model))
    facts["untrained"] = pseudo_word_stats(fresh, [1000 + k for k in range(scale.codes)])
    facts["bleed"] = context_bleed(model, load_mapper(os.path.join(runs[0], "mapper.safetensors")), [1000 + k for k in range(scale.codes)])
    # Curves of the first full run: the loss terms from its log, Face Sim / Div from its checkpoints.
    with open(os.path.join(runs[0], "log.jsonl")) as fh:
        log = [json.loads(line) for line in fh if line.strip()]
    line_plot({k: [(r["step"], r[k]) for r in log] for k in ("l_pos", "l_back", "d_neg")},
              os.path.join(figures, "curve_loss.png"), "loss terms (full CoCoIns, seed 0)", "value")
    facts["curve"] = exp.curve(model, judge, runs[0])
    line_plot({k: [(c["step"], c[k]) for c in facts["curve"]] for k in ("face_sim", "face_div", "identity_agreement")},
              os.path.join(figures, "curve_face_sim.png"), "Face Sim / Face Div / agreement over training", "value")
    command = "python -m toyworld" + (f" --scale {args.scale}" if args.scale != "full" else "") + (
        f" --rows {args.rows}" if args.rows != "all" else "") + (f" --mapper-seeds {args.mapper_seeds}" if args.mapper_seeds else "") + (
        f" --threads {args.threads}" if args.threads else "") + (f" --jobs {args.jobs}" if args.jobs > 1 else "")
    facts["figures"] = figures
    facts["machine"] = f"{torch.get_num_threads()} CPU threads"

    def report():
        facts["seconds"] = time.time() - t0
        # What the cached steps cost when they ran (a rerun reuses them, so its own wall time is short).
        mapper_seconds = 0
        for run in dict.fromkeys(runs):  # a run two rows share counts once
            with open(os.path.join(run, "done.json")) as fh:
                mapper_seconds += json.load(fh)["seconds"]
        facts["step_minutes"] = {"world": facts["world"]["seconds"] / 60, "vae": facts["base_facts"]["vae_seconds"] / 60,
                                 "unet": facts["base_facts"]["unet_seconds"] / 60, "judge": facts["judge"]["seconds"] / 60,
                                 "mapper runs (each on its own, summed)": mapper_seconds / 60}
        write_results(args.results, command, args.scale, facts)

    report()  # the core rows are on disk before the ablations start
    if args.rows == "all":
        # What one word can hold in this base model: a word learned for each evaluated person (about 40 min).
        exp.log("learning one word per evaluated person (textual inversion): what one pseudo-word can hold")
        facts["inverted"] = {family: exp.inverted_row(model, judge, family, os.path.join(figures, f"contact_inverted_{family}.png")
                                                      if family == "layernorm" else None) for family in inversion.FAMILIES}
        report()
        train_side_by_side([(row, seed) for row in ROWS[1:] for seed in range(row.seeds)])
        facts["ablations"] = []
        for row in ROWS[1:]:
            row_runs = [exp.train_row(row, seed) for seed in range(row.seeds)]
            runs += row_runs
            seeds = [exp.eval_row(model, judge, os.path.join(run, "mapper.safetensors"),
                                  os.path.join(figures, row.figure) if row.figure and seed == 0 else None,
                                  "CoCoIns, " + row.name.replace("γ", "gamma"))  # (the figure font has no γ)
                     for seed, run in enumerate(row_runs)]
            m = _aggregate(seeds) if row.seeds > 1 else seeds[0]
            name = row.name + (f" ({row.seeds} seeds)" if row.seeds > 1 else "")
            facts["ablations"].append({"name": name, "table": row.table, "flags": " ".join(row.flags),
                                       "paper": row.paper, **m})
            exp.log(f"{row.name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
            report()
    for c, ok, v in facts["verdicts"]:
        exp.log(f"{'MET ' if ok else 'MISS'} {c}: {v}")
    exp.log(f"wrote {args.results}")
