"""The toy-world experiment: do codes become people, and what of it transfers to SDXL?

One command runs it all and writes `toyworld/RESULTS.md` with its figures:

    python -m toyworld --threads 1 --jobs 2              # everything (about 4.5 h on 2 cores)
    python -m toyworld --threads 1 --jobs 2 --rows core  # two base models, CoCoIns over 3 mapper seeds and one
                                                         # learned word per person on each (about 2.3 h)
    python -m toyworld --scale smoke                     # every step at toy-of-toy size in a few minutes (CI)

Steps, each cached in `--work` under its settings (a rerun skips what exists, a changed setting redoes what
depends on it):
1. the world (toyworld/world.py): people, some known by a one-token name, in images of varied original sizes;
   the unnamed people's images, as small non-square files, are the mapper's CelebA;
2. base models (toyworld/base.py), `--base-seeds` of them: a VAE, then a UNet and text encoders, each saved as an
   official-layout SDXL single file; and, for the γ question, one of another UNet width;
3. a judge per VAE (toyworld/judge.py);
4. mappers, trained by the project's own command on the mapper's CelebA:
       python train.py --data WORK/data-mapper --weights WORK/base-seed0.safetensors --resolution 64 ... FLAGS
   nothing toy-specific goes into train.py: rows differ only in its flags;
5. evaluation (toyworld/measures.py): codes x scenes x seeds images of "a photo of a {man|woman} {scene}", read
   by the judge; the same for the reference rows (the dataset, the base model without codes, people described
   in words or called by name, one word learned per person);
6. the report (toyworld/report.py).

Read next: toyworld/measures.py.
"""

import argparse
import glob
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial

import numpy as np
import PIL
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.checkpoint import load_mapper
from model.mapper import Mapper, MapperConfig, code_to_z
from model.sdxl import SDXL
from model.vae import AutoencoderKL
from toyworld import base, inversion, judge as judge_lib, measures, report, world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONCEPTS = measures.CONCEPTS


# -- what is run ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    flags: tuple[str, ...] = ()  # train.py flags on top of the scale's common ones
    seeds: int = 1  # mapper seeds


FULL = Row("CoCoIns (full)")
# γ, the final weight of the reciprocal negative term, from 1e-4 to 1e-1 (the full row is 1e-2), on two base
# models of different UNet width: does the best γ stay put? It did (1e-2 on both, by identity agreement; Face Sim
# within 2 seeds' spreads over the four decades; RESULTS.md), so γ's relative unit (train.py --gamma-unit
# d_neg) is not swept here. Measured once on base seed 0, that unit's D (the mean d_neg of the first 20 steps,
# before any negative term) is ~1e-3: the spread of an untrained mapper's words, codes not yet apart, not a scale of
# the model; γ = 0.1, 1 and 10 D² (the full row's flags plus --gamma-unit d_neg --gamma G) let codes collapse
# into one person (Face Div 0.128, 0.173, 0.297 against 0.454).
GAMMAS = {1e-4: Row("γ = 1e-4", ("--gamma", "0.0001")), 1e-3: Row("γ = 1e-3", ("--gamma", "0.001")),
          1e-2: FULL, 1e-1: Row("γ = 1e-1", ("--gamma", "0.1"))}
# SDXL's size/crop conditioning in training: the image's own ("data", the default) or what sampling passes.
TIME_IDS_SAMPLING = Row("--time-ids sampling", ("--time-ids", "sampling"), seeds=3)
# Codes' words vary in about two directions: does a term that spreads them over more (train.py --lambda-spread, not
# in the paper) spread the people too (the shirt census), and does it cost the prompt?
SPREAD = Row("word spread λ = 10", ("--lambda-spread", "10"))


@dataclass
class Scale:
    world_config: world.WorldConfig = field(default_factory=world.WorldConfig)
    base_config: base.BaseConfig = field(default_factory=base.BaseConfig)
    wide_channels: int = 128  # the UNet width of the second base model of the γ question
    judge_images: int = 6000  # rendered images to train the judge on (each also seen through the VAE)
    judge_steps: int = 800
    mapper_steps: int = 400  # K, train.py --steps
    mapper_batch: int = 8
    mapper_lr: float = 1e-3
    checkpoint_every: int = 100  # also the spacing of the Face Sim curve
    codes: int = 8  # codes per concept word (man, woman)
    seeds: int = 2  # images per code and scene
    census_codes: int = 48  # codes per concept word whose people are counted by shirt colour (one image per scene)
    scenes: tuple[str, ...] = world.SCENES
    steps: int = 20  # DDIM steps
    guidance: float = 3.0
    base_seeds: int = 2  # base models trained from scratch (their spread is part of every headline number)
    mapper_seeds: int = 3  # mapper seeds of the full row on each base model
    footprint_pairs: int = 200  # render pairs per factor for `factor_footprints`
    inversion_steps: int = 1000  # textual-inversion steps per person (toyworld/inversion.py)
    inversion_images: int = 32  # renders of each person it learns from
    inversion_lr: float = 5e-2  # Adam's step on the word (in units of a token's spread)


SCALES = {
    "full": Scale(),
    "smoke": Scale(
        world_config=world.WorldConfig(identities=12, images_per_identity=2, named=6),
        base_config=base.BaseConfig(vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=4),
        wide_channels=64 + 32, judge_images=16, judge_steps=2, mapper_steps=2, mapper_batch=2, checkpoint_every=1,
        codes=2, seeds=1, census_codes=2, scenes=("beach", "snow"), steps=2, base_seeds=2, mapper_seeds=2,
        footprint_pairs=2, inversion_steps=2, inversion_images=2,
    ),
}


# -- what is drawn ---------------------------------------------------------------------------------


def eval_jobs(scale: Scale, offset: int = 0, codes: int | None = None, seeds: int | None = None,
              first_code: int = 0) -> list[dict]:
    """codes x scenes x seeds per concept word; the seed depends on (concept, code, scene, repeat) so that,
    without pseudo-words, the images grouped under one code index are random people. `offset` shifts every
    seed (the base model's rows over several seeds)."""
    jobs = []
    for c, concept in enumerate(CONCEPTS):
        for code in range(first_code, first_code + (scale.codes if codes is None else codes)):
            for s, scene in enumerate(scale.scenes):
                for r in range(scale.seeds if seeds is None else seeds):
                    jobs.append({"concept": concept, "code": 1000 * (c + 1) + code, "scene": scene,
                                 "prompt": world.prompt(concept, scene),
                                 "seed": 1_000_003 * offset + 100_000 * c + 1000 * code + 10 * s + r})
    return jobs


def census_jobs(scale: Scale) -> list[dict]:
    """More codes than `eval_jobs` (after its codes), one image per scene: how their people spread over the looks."""
    return eval_jobs(scale, codes=scale.census_codes, seeds=1, first_code=scale.codes)


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


def by_name_jobs(scale: Scale, truth: list[dict]) -> list[dict]:
    """`eval_jobs`' codes x scenes x seeds with each code index standing for one of the world's named people,
    called by name ("a photo of a paella woman on the beach"): what one token the text encoders learned to read
    holds of a person. Each job carries the person's true factors, so the images can be checked against them."""
    people = {}
    for t in truth:
        if t.get("name"):
            people.setdefault(t["gender"], {}).setdefault(t["identity"], t)
    jobs = eval_jobs(scale)
    for j in jobs:
        named = list(people.get(j["concept"], {}).values())
        t = named[j["code"] % 1000 % len(named)]
        j["prompt"] = world.prompt(j["concept"], j["scene"], t["name"])
        j["truth"] = [world.FACTORS[f].index(t[f]) for f in world.FACTORS]
    return jobs


def generate(model: SDXL, jobs: list[dict], words=None, steps: int = 20, guidance: float = 3.0,
             batch: int = 64) -> torch.Tensor:
    """Images (N, 3, 64, 64) uint8 for jobs {"prompt", "seed", "concept"} through the pipeline's one
    `SDXL.generate`; `words`: None, or (w_l, w_g), one pseudo-word per job, inserted before its concept word."""
    subjects = None if words is None else [(words[0], words[1], [j["concept"] for j in jobs])]
    images = model.generate([j["prompt"] for j in jobs], [j["seed"] for j in jobs], subjects, steps=steps,
                            guidance=guidance, width=world.SIZE, height=world.SIZE, batch_size=batch)
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def code_words(mapper, jobs: list[dict]):
    """(w_l, w_g): the mapper's pseudo-word of each job's code."""
    return mapper(torch.stack([code_to_z(j["code"], mapper.config.z_dim) for j in jobs]))


# -- the steps -----------------------------------------------------------------------------------


def file_digest(path: str) -> str:
    """SHA-256 of a file: what a cached step that reads it is keyed by (a retrained file is a new file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class Experiment:
    """The steps on one base model, each cached in `work` under its settings. `base_config` picks the base model
    (default: the scale's); its files are named by what sets it apart (`base-seed0.safetensors`,
    `vae-seed0.safetensors`, `judge-seed0.pt`); the world is shared."""

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
        wide = cfg.model_channels != base.UNET.model_channels
        self.tag = f"seed{cfg.seed}" + (f"-ch{cfg.model_channels}" if wide else "")
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

    # -- the world, the base model, the judge ----------------------------------------------------

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
        figure = os.path.join(self.figures, f"vae_reconstructions_seed{self.base_cfg.seed}.png")
        vae, facts = base.make_vae(self.data, self.base_cfg, self.log, figure=figure)
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
        facts = base.train_base(self.data, self.weights, vae, self.base_cfg, self.log,
                                self.scale.world_config.name_rate)
        return {**vae_facts, **self._done(name, config, facts)}

    def row_cache(self, name: str) -> str:
        """Where `eval_jobs_row` keeps the scores of a row of this base model without a mapper."""
        os.makedirs(os.path.join(self.work, "rows"), exist_ok=True)
        return os.path.join(self.work, "rows", f"{self.tag}-{name}.json")

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
        judge = judge_lib.train_judge(torch.cat([images, rec]), torch.cat([labels, labels]), self.scale.judge_steps,
                                      log=self.log)
        torch.save(judge.state_dict(), self.judge_path)
        facts = {"held_out_rendered": judge_lib.accuracy(judge, held_images, held_labels),
                 "held_out_through_vae": judge_lib.accuracy(judge, held_rec, held_labels),
                 "seconds": round(time.time() - t0)}
        self.log(f"judge: held-out accuracy {facts['held_out_rendered']['person']:.3f} (all seven factors, rendered), "
                 f"{facts['held_out_through_vae']['person']:.3f} (through the VAE)")
        return judge, self._done(name, config, facts)

    def footprints(self, model: SDXL) -> dict:
        """`measures.factor_footprints` through this base model's VAE, kept beside it."""
        name = f"footprints-seed{self.base_cfg.seed}"
        config = {"vae_sha256": file_digest(self.vae_path), "pairs": self.scale.footprint_pairs}
        if done := self._cached(name, config):
            return done["latent_l2"]
        footprints = measures.factor_footprints(model.vae, self.scale.footprint_pairs)
        return self._done(name, config, {"latent_l2": footprints})["latent_l2"]

    @torch.no_grad()
    def round_trip(self, model: SDXL, images: torch.Tensor) -> torch.Tensor:
        """Images through the toy VAE and back (what a generated image looks like at best)."""
        out = []
        for i in range(0, len(images), 128):
            z = model.vae.encode(base.to_unit(images[i : i + 128])).mode()
            out.append(torch.from_numpy(model.decode(z * base.SCALING_FACTOR)).permute(0, 3, 1, 2))
        return torch.cat(out)

    def truth(self) -> list[dict]:
        return base.load_world_truth(self.data)

    def dataset_rows(self, judge: judge_lib.Judge, model: SDXL) -> tuple[dict, dict, dict]:
        """The dataset's scores and shirt census, its people drawn as sampling asks for them (a 64 px square
        original, whatever size the world's file had), as they are and after the VAE's round trip (the best a
        generated image of the toy SDXL can look), read by the same judge."""
        truth = self.truth()
        images = world_renders(truth)
        by_person: dict[int, list[int]] = {}
        for i, t in enumerate(truth):
            by_person.setdefault(t["identity"], []).append(i)
        scenes = [world.SCENES.index(t["scene"]) for t in truth]
        rendered, through = (measures.score(judge.read(x), list(by_person.values()), scenes)
                             for x in (images, self.round_trip(model, images)))
        return rendered, through, measures.dataset_census(truth)

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
        return {"named_attribute_accuracy": float(np.mean(hit)),
                "per_factor": {f: float(np.mean(h)) for f, h in per_factor.items()},
                "chance": chance, "prompts": len(jobs)}

    # -- mapper rows -----------------------------------------------------------------------------

    def train_row(self, row: Row, seed: int) -> str:
        """Train (or reuse) one mapper with train.py, on one CPU thread (a run's numbers then do not depend on the
        machine's cores, and two runs side by side use two cores fully); returns its run folder."""
        s = self.scale
        run = os.path.join(self.work, "runs", f"{_slug(row.name)}-{self.tag}-seed{seed}")
        cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", self.mapper_data, "--weights", self.weights,
               "--out", run, "--cache-dir", os.path.join(self.work, "latents"), "--resolution", str(world.SIZE),
               "--steps", str(s.mapper_steps), "--batch-size", str(s.mapper_batch), "--lr", str(s.mapper_lr),
               "--checkpoint-every", str(s.checkpoint_every), "--sample-every", "0", "--num-workers", "0",
               "--device", "cpu", "--seed", str(seed), *row.flags]
        done = os.path.join(run, "done.json")
        identity = json.loads(json.dumps(self.run_identity(cmd[2:])))  # as done.json keeps it (tuples as lists)
        # A finished run with the same resolved settings (under any row name) is this row's run.
        for other in sorted(glob.glob(os.path.join(self.work, "runs", "*", "done.json"))):
            with open(other) as f:
                if {**BEFORE_FLAG, **json.load(f).get("identity", {})} == identity:
                    return os.path.dirname(other)
        if os.path.isfile(done):
            shutil.rmtree(run)
        resume = ["--resume"] if os.path.isfile(os.path.join(run, "state.pt")) else []
        self.log(f"training {row.name} on base {self.tag} (seed {seed}): {' '.join(cmd[1:])}")
        t0 = time.time()
        snapshots = os.path.join(run, "snapshots")
        stop = threading.Event()
        watcher = threading.Thread(target=_watch_checkpoints, args=(run, snapshots, stop), daemon=True)
        watcher.start()
        try:
            proc = subprocess.run(cmd + resume, cwd=ROOT, capture_output=True, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
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

    def eval_jobs_row(self, model: SDXL, judge: judge_lib.Judge, jobs: list[dict], words=None,
                      figure: str | None = None, title: str = "", cache: str | None = None,
                      census: list[dict] | None = None, census_words=None) -> dict:
        """Draw `jobs` (with `words`, one pseudo-word pair per job, or none) and score them; `census`: more jobs
        whose people are counted by shirt colour. With `cache`, the scores are kept in that file, valid while
        the base model, the judge, the words and the sampling settings stay the same."""
        key = None
        if cache:
            h = hashlib.sha256()
            for w in (words or ()) + (census_words or ()):
                h.update(w.detach().contiguous().numpy().tobytes())
            key = {"base": file_digest(self.weights), "judge": file_digest(self.judge_path), "jobs": jobs,
                   "census": census, "words": h.hexdigest(), "steps": self.scale.steps,
                   "guidance": self.scale.guidance, "measures": measures.METRICS_VERSION}
            if os.path.isfile(cache) and not figure:
                with open(cache) as f:
                    kept = json.load(f)
                if kept["key"] == json.loads(json.dumps(key)):
                    return kept["metrics"]
        images = generate(model, jobs, words, self.scale.steps, self.scale.guidance)
        if figure:
            report.contact_sheet(images, jobs, figure, title=title)
        metrics = measures.score_generated(images, jobs, judge)
        if census:
            metrics["census"] = measures.census(generate(model, census, census_words, self.scale.steps,
                                                         self.scale.guidance), census, judge)
        if cache:
            with open(cache + ".tmp", "w") as f:
                json.dump({"key": key, "metrics": metrics}, f)
            os.replace(cache + ".tmp", cache)
        return metrics

    def mapper_row(self, model: SDXL, judge: judge_lib.Judge, mapper_path: str, figure: str | None = None,
                   title: str = "", census: bool = True) -> dict:
        """A trained mapper's codes, scored (kept beside the mapper) with its words' statistics and shirt census."""
        mapper = load_mapper(mapper_path)
        jobs, more = eval_jobs(self.scale), census_jobs(self.scale) if census else None
        with torch.no_grad():
            words, census_words = code_words(mapper, jobs), (code_words(mapper, more) if census else None)
        metrics = self.eval_jobs_row(model, judge, jobs, words, figure, title, mapper_path + ".metrics.json",
                                     more, census_words)
        return {**metrics, **measures.mapper_word_stats(mapper, sorted({j["code"] for j in jobs}))}

    def learned_words(self, model: SDXL, family: str = "layernorm") -> tuple[list, list, dict]:
        """A word of `family` learned by textual inversion (toyworld/inversion.py) for each evaluated person:
        (the people's (concept, code) keys, their (w_l, w_g) words, the step's facts), kept in the work folder."""
        s = self.scale
        keys = sorted({(j["concept"], j["code"]) for j in eval_jobs(s)})
        name = f"inversion-{family}-{self.tag}"
        path = os.path.join(self.work, f"{name}.pt")
        config = {"base_sha256": file_digest(self.weights), "keys": [list(k) for k in keys], "family": family,
                  "steps": s.inversion_steps, "images": s.inversion_images, "lr": s.inversion_lr}
        done = self._cached(name, config)
        if done and os.path.isfile(path):
            return keys, torch.load(path, weights_only=True), done
        t0 = time.time()
        stats = token_stats(model)
        learned = [inversion.invert(model, code_person(code, concept), concept, stats, family,
                                    steps=s.inversion_steps, images=s.inversion_images, lr=s.inversion_lr, seed=code)
                   for concept, code in keys]
        torch.save(learned, path + ".tmp")
        os.replace(path + ".tmp", path)
        done = self._done(name, config, {"seconds": round(time.time() - t0), "threads": torch.get_num_threads()})
        self.log(f"textual inversion ({family}, base {self.tag}): {len(keys)} people in {done['seconds']} s")
        return keys, learned, done

    def inverted_row(self, model: SDXL, judge: judge_lib.Judge, family: str = "layernorm",
                     figure: str | None = None) -> dict:
        """The evaluation with each code's pseudo-word replaced by a word learned for its person
        (`learned_words`): what one word of `family` can hold, an upper bound for a mapper."""
        jobs = eval_jobs(self.scale)
        keys, learned, done = self.learned_words(model, family)
        stats = token_stats(model)
        index = [keys.index((j["concept"], j["code"])) for j in jobs]
        words = (torch.stack([learned[i][0] for i in index]), torch.stack([learned[i][1] for i in index]))
        metrics = self.eval_jobs_row(model, judge, jobs, words, figure, f"one learned word per person ({family})")
        mean, std = stats[0]
        return {**metrics, **measures.word_stats(torch.stack([w for w, _ in learned]), mean, std),
                "seconds": done["seconds"]}

    def curve(self, model: SDXL, judge: judge_lib.Judge, run: str) -> list[dict]:
        """Face Sim and Face Div of every checkpoint snapshot of a run (the curve over training)."""
        folder = os.path.join(run, "snapshots")
        points = []
        names = [n for n in os.listdir(folder) if n.endswith(".safetensors")]  # not the scores kept beside them
        for name in sorted(names, key=lambda n: int(n.split("_")[1].split(".")[0])):
            step = int(name.split("_")[1].split(".")[0])
            points.append({"step": step, **self.mapper_row(model, judge, os.path.join(folder, name), census=False)})
        return points


def world_renders(truth: list[dict]) -> torch.Tensor:
    """The world's images drawn anew as 64 px square originals (N, 3, 64, 64) uint8, from their recorded
    placements (the first passes' world, without them, is already that)."""
    images = []
    for t in truth:
        who = world.Identity(*(world.FACTORS[f].index(t[f]) for f in world.FACTORS))
        images.append(world.render(who, world.Placement(**t["placement"]))[0])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def token_stats(model: SDXL) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(mean, std) of each encoder's token table, in the mapper's order, as train.py computes them for f."""
    import train

    return train.token_stats(model)


# train.py flags added after runs were recorded, with the value those runs computed with (a flag's
# first default reproduces what train.py did before it existed).
BEFORE_FLAG = {"mapper_gain": 1.0, "lambda_spread": 0.0, "gamma_unit": "absolute"}


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


def read_log(run: str) -> list[dict]:
    with open(os.path.join(run, "log.jsonl")) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def distances(run: str, first: int = 50) -> dict:
    """A run's distances from its log.jsonl: d_neg and l_pos (= d_pos) over its first and last `first` steps; D²,
    the square of the mean d_neg of its first 20 steps (γ's unit under --gamma-unit d_neg, step.py); and γ's
    effective value in both units: `gamma_abs` (λ_neg's γ, the unit applied) and `gamma_rel` (that over D²)."""
    log = read_log(run)
    mean = lambda rows, k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    d2 = mean(log[:20], "d_neg") ** 2
    scale = log[-1].get("gamma_scale", 1.0)  # (1: absolute; D² once measured: d_neg)
    args = json.loads(json.dumps(run_identity(json.load(open(os.path.join(run, "done.json")))["command"][1:])))
    return {"d_neg_first": mean(log[:first], "d_neg"), "d_neg_last": mean(log[-first:], "d_neg"),
            "d_pos_first": mean(log[:first], "l_pos"), "d_pos_last": mean(log[-first:], "l_pos"),
            "D2": d2, "gamma_abs": args["gamma"] * scale, "gamma_rel": args["gamma"] * scale / d2}


def prepare_base(exp: Experiment) -> dict:
    """Every step of one base model that needs no other: its VAE, its UNet and text towers, its judge."""
    facts = exp.make_base()
    exp.make_judge(exp.load_model())
    return facts


def learn_words(exp: Experiment) -> dict:
    """One base model's textual-inversion words (`Experiment.learned_words`), kept in the work folder."""
    return exp.learned_words(exp.load_model())[2]


def _one_thread(step, exp: Experiment) -> dict:
    torch.set_num_threads(1)
    return step(exp)


def side_by_side(step, exps: list[Experiment], jobs: int) -> list:
    """`step(exp)` for each base model, `jobs` at a time, each in its own process on one thread (as a mapper run
    gets): base.py and judge.py seed torch's global generator, which two trainings in one process would share.
    With one job they run here, one after another, on this process's threads."""
    if jobs <= 1 or len(exps) <= 1:
        return [step(exp) for exp in exps]
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state carried over
    with ProcessPoolExecutor(min(jobs, len(exps)), mp_context=spawn) as pool:
        return list(pool.map(partial(_one_thread, step), exps))


# -- the command ----------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m toyworld", description=__doc__.split("\n")[0])
    p.add_argument("--scale", default="full", choices=sorted(SCALES),
                   help="full: the experiment; smoke: the plumbing in a few minutes")
    p.add_argument("--rows", default="all", choices=["all", "core"],
                   help="core: the base models, full CoCoIns over seeds and one learned word per person; all: plus "
                        "γ on two widths, the size conditioning and the word-spread term")
    p.add_argument("--work", default=os.path.join(ROOT, "toyworld", "cache"),
                   help="where the world, the models and the runs are kept (rerun skips what exists)")
    p.add_argument("--results", default=os.path.join(ROOT, "toyworld", "RESULTS.md"), help="the report to write")
    p.add_argument("--figures", default=None, help="folder for the figures (default: figures/ beside --results)")
    p.add_argument("--base-seeds", type=int, default=0,
                   help="base models trained from scratch (0: the scale's, 2 at full scale)")
    p.add_argument("--mapper-seeds", type=int, default=0,
                   help="mapper seeds of the full row on each base model (0: the scale's, 3)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads of this process (0: PyTorch's choice); what runs side by side uses one each")
    p.add_argument("--jobs", type=int, default=1,
                   help="mapper runs, base models and textual inversions run side by side (2 on a 2-core machine)")
    return p.parse_args(argv)


def command_line(args) -> str:
    """The command that made a report, as a user would type it."""
    flags = [("--scale", args.scale, "full"), ("--rows", args.rows, "all"), ("--base-seeds", args.base_seeds, 0),
             ("--mapper-seeds", args.mapper_seeds, 0), ("--threads", args.threads, 0), ("--jobs", args.jobs, 1)]
    return "python -m toyworld" + "".join(f" {flag} {value}" for flag, value, default in flags if value != default)


class Run:
    """One invocation: the base models, the facts gathered so far, and the report rewritten as they arrive."""

    def __init__(self, args):
        scale = SCALES[args.scale]
        if args.base_seeds:
            scale = replace(scale, base_seeds=args.base_seeds)
        if args.mapper_seeds:
            scale = replace(scale, mapper_seeds=args.mapper_seeds)
        self.args, self.scale, self.t0 = args, scale, time.time()
        self.figures = args.figures or os.path.join(os.path.dirname(os.path.abspath(args.results)), "figures")
        self.bases = [Experiment(scale, args.work, self.figures, base_config=replace(scale.base_config, seed=b))
                      for b in range(scale.base_seeds)]
        self.wide = Experiment(scale, args.work, self.figures,
                               base_config=replace(scale.base_config, model_channels=scale.wide_channels))
        self.facts = {"command": command_line(args), "scale": args.scale,
                      "machine": f"{torch.get_num_threads()} CPU threads", "torch": torch.__version__,
                      "pillow": PIL.__version__, "base_seeds": scale.base_seeds, "mapper_seeds": scale.mapper_seeds,
                      "figures": self.figures}
        self.runs: list[str] = []  # every mapper run the report uses

    def log(self, message: str):
        self.bases[0].log(message)

    def train_side_by_side(self, pairs):
        """(experiment, row, seed) runs, `--jobs` train.py processes at a time; the steps after find them done."""
        with ThreadPoolExecutor(max(1, self.args.jobs)) as pool:
            return list(pool.map(lambda p: p[0].train_row(p[1], p[2]), pairs))

    def report(self):
        self.facts["seconds"] = time.time() - self.t0
        seconds = 0
        for run in dict.fromkeys(self.runs):  # a run two rows share counts once
            with open(os.path.join(run, "done.json")) as fh:
                seconds += json.load(fh)["seconds"]
        self.facts["mapper_minutes"] = seconds / 60
        report.write_results(self.args.results, self.facts)

    # -- the named steps -----------------------------------------------------------------------

    def base_models(self):
        """The world, then each base model with its judge, `--jobs` base models side by side."""
        self.facts["world"] = self.bases[0].make_world()
        made = side_by_side(prepare_base, self.bases, self.args.jobs)
        self.facts["bases"] = [{"tag": exp.tag, "base_facts": facts} for exp, facts in zip(self.bases, made)]

    def core_runs(self):
        pairs = [(exp, FULL, seed) for exp in self.bases for seed in range(self.scale.mapper_seeds)]
        runs = self.train_side_by_side(pairs)
        self.runs += runs
        return runs

    def evaluate_base(self, k: int, exp: Experiment, runs: list[str]) -> dict:
        """Every reference row and the full rows of one base model."""
        s, first = self.scale, k == 0
        fig = lambda name: os.path.join(self.figures, name) if first else None  # noqa: E731
        model = exp.load_model()
        judge, judge_facts = exp.make_judge(model)
        f = self.facts["bases"][k]
        f["judge"] = judge_facts
        f["dataset"], f["dataset_vae"], f["dataset_census"] = exp.dataset_rows(judge, model)
        f["quality"] = exp.base_quality(model, judge)
        kept = exp.row_cache  # the rows without a mapper, kept in the work folder (a rerun that draws a figure redraws)
        f["base_rows"] = [exp.eval_jobs_row(model, judge, eval_jobs(s, offset), None,
                                            fig("contact_base.png") if offset == 0 else None, "base model, no code",
                                            kept(f"base-{offset}"), census=census_jobs(s) if offset == 0 else None)
                          for offset in range(s.mapper_seeds)]
        f["named"] = {key: exp.eval_jobs_row(model, judge, named_jobs(s, factors), None,
                                             fig("contact_named.png") if key == "all 7" else None,
                                             "base model, the person named in full", kept(f"named-{_slug(key)}"))
                      for key, factors in NAMED.items()}
        if s.world_config.named:
            f["by_name"] = exp.eval_jobs_row(model, judge, by_name_jobs(s, exp.truth()), None,
                                             fig("contact_by_name.png"),
                                             "base model, named people called by name", kept("by-name"))
        f["full_rows"] = [exp.mapper_row(model, judge, os.path.join(run, "mapper.safetensors"),
                                         fig("contact_cocoins.png") if seed == 0 else None, "CoCoIns")
                          for seed, run in enumerate(runs)]
        if first:
            f["footprints"] = exp.footprints(model)
            mapper = load_mapper(os.path.join(runs[0], "mapper.safetensors"))
            f["bleed"] = measures.context_bleed(model, mapper, [1000 + c for c in range(s.codes)])
            torch.manual_seed(0)  # an untrained mapper, train.py's initialisation: how many directions words start in
            widths = (model.clip_l.config.width, model.clip_g.config.width)
            fresh = Mapper(MapperConfig(token_widths=widths), token_stats(model))
            f["untrained"] = measures.mapper_word_stats(fresh, [1000 + c for c in range(s.codes)])
            log = read_log(runs[0])
            report.line_plot({key: [(r["step"], r[key]) for r in log] for key in ("l_pos", "l_back", "d_neg")},
                             os.path.join(self.figures, "curve_loss.png"), "loss terms (full CoCoIns, seed 0)", "value")
            f["curve"] = exp.curve(model, judge, runs[0])
            curves = {key: [(c["step"], c[key]) for c in f["curve"]]
                      for key in ("face_sim", "face_div", "identity_agreement")}
            report.line_plot(curves, os.path.join(self.figures, "curve_face_sim.png"),
                             "Face Sim / Face Div / agreement over training", "value")
        return f

    def inversion(self):
        """One word learned per person on each base model (`--jobs` side by side), then each scored."""
        side_by_side(learn_words, self.bases, self.args.jobs)
        for k, exp in enumerate(self.bases):
            model = exp.load_model()
            judge, _ = exp.make_judge(model)
            self.facts["bases"][k]["inverted"] = exp.inverted_row(
                model, judge, "layernorm", os.path.join(self.figures, "contact_inverted.png") if k == 0 else None)
            self.report()

    def gamma(self):
        """γ over four decades (absolute) on the first base model and on the wide one: where is Face Sim best, and
        at what distances d_neg."""
        self.wide.make_base()
        exps = {"64 channels (base seed 0)": self.bases[0], f"{self.scale.wide_channels} channels": self.wide}
        pairs = [(exp, row, 0) for exp in exps.values() for row in GAMMAS.values()]
        runs = dict(zip([(id(exp), row.name) for exp, row, _ in pairs], self.train_side_by_side(pairs)))
        self.runs += runs.values()
        self.facts["gamma"] = {}
        for label, exp in exps.items():
            model = exp.load_model()
            judge, _ = exp.make_judge(model)  # the wide model shares the first base model's VAE, so its judge
            self.facts["gamma"][f"{label}, γ absolute"] = [
                {"gamma": g, "unit": "absolute", **distances(runs[id(exp), row.name]),
                 **exp.mapper_row(model, judge, os.path.join(runs[id(exp), row.name], "mapper.safetensors"),
                                  census=False)}
                for g, row in GAMMAS.items()]
            self.report()

    def time_ids(self):
        """The size/crop conditioning: the mapper trained with its images' own (the full rows) or with sampling's."""
        exp = self.bases[0]
        runs = self.train_side_by_side([(exp, TIME_IDS_SAMPLING, seed) for seed in range(TIME_IDS_SAMPLING.seeds)])
        self.runs += runs
        model = exp.load_model()
        judge, _ = exp.make_judge(model)
        rows = [exp.mapper_row(model, judge, os.path.join(run, "mapper.safetensors"), census=False) for run in runs]
        self.facts["time_ids"] = {"sampling": report.aggregate(rows),
                                  "data": report.aggregate(self.facts["bases"][0]["full_rows"][:len(rows)])}


def spread_row(run: "Run") -> None:
    """The word-spread term on the first base model, one seed: its words' directions, its census, its prompt."""
    exp = run.bases[0]
    (path,) = run.train_side_by_side([(exp, SPREAD, 0)])
    run.runs.append(path)
    model = exp.load_model()
    judge, _ = exp.make_judge(model)
    run.facts["spread"] = exp.mapper_row(model, judge, os.path.join(path, "mapper.safetensors"))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Run(args)
    run.base_models()
    core = run.core_runs()
    per_base = [core[k * run.scale.mapper_seeds:(k + 1) * run.scale.mapper_seeds] for k in range(len(run.bases))]
    for k, exp in enumerate(run.bases):
        run.evaluate_base(k, exp, per_base[k])
    run.report()  # the core rows are on disk before the longer steps start
    if args.rows == "all":  # each question's answer is on disk before the next, the longest (inversion) last
        run.gamma()
        run.time_ids()
        run.report()
        spread_row(run)
        run.report()
    run.inversion()
    for criterion, verdict, value in report.verdicts(run.facts):
        run.log(f"{verdict}: {criterion}: {value}")
    run.log(f"wrote {args.results}")
