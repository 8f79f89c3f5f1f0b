"""The toy model this project ships in weights/toy/: the experiment's first base model, its full-CoCoIns mapper
and its judge, made by one command and checked to be what that command makes.

    python -m toyworld.ship --threads 1          # weights/toy/{base,mapper,judge}.safetensors + manifest.json

It runs the experiment's own steps (toyworld/experiment.py: the world, base model seed 0 with its judge, the
full row's mapper seed 0; cached in --work like the experiment's, so after `python -m toyworld` it only
converts), then stores each part in float16 where that changes no image by more than 1/255 (and no judge
reading at all), else in float32, and writes `manifest.json`: the command, the settings it ran with, the
sampling settings sample.py uses for this model, the words it knows, and each file's SHA-256.

Training is deterministic for a given torch version and thread count (the toy world's steps seed every
generator; the mapper trains on one thread), so the same command on the same torch and --threads makes the
same bytes; another thread count sums in another order and makes another, equally good model.

Read next: toyworld/RESULTS.md.
"""

import argparse
import json
import os
import sys
from dataclasses import asdict

import numpy as np
import PIL
import torch
from safetensors.torch import load_file, save_file

from model import export
from model.checkpoint import PREFIX, load_mapper, read_metadata, save_safetensors
from toyworld import experiment, judge as judge_lib, world

ROOT = experiment.ROOT
OUT = os.path.join(ROOT, "weights", "toy")
# The base model's parts, by the official single file's prefixes.
PARTS = ("unet", "vae", "clip_l", "clip_g")


def settings(scale: experiment.Scale) -> dict:
    """What the shipped files are made with: the experiment's current settings for them. tests/test_toyworld.py
    compares these with the manifest's, so the shipped model cannot drift from toyworld/ unnoticed."""
    return {"world": asdict(scale.world_config), "base": asdict(scale.base_config),
            "judge": {"images": scale.judge_images, "steps": scale.judge_steps},
            "mapper": {"row": experiment.FULL.name, "seed": 0, "steps": scale.mapper_steps,
                       "batch_size": scale.mapper_batch, "lr": scale.mapper_lr, "flags": list(experiment.FULL.flags)},
            "sampling": sampling(scale)}


def sampling(scale: experiment.Scale) -> dict:
    """The settings sample.py uses for the toy model where the user gives none (the experiment's)."""
    return {"width": world.SIZE, "height": world.SIZE, "steps": scale.steps, "guidance": scale.guidance}


def words() -> dict:
    """What the toy model knows: its concept words, its scenes (the prompts' phrases) and its attribute words."""
    return {"concepts": ["man", "woman", "person"], "scenes": {s: p[0] for s, p in world.SCENE_PHRASES.items()},
            "attributes": {f: list(v) for f, v in world.FACTORS.items() if f != "gender"}}


def probe_jobs(n_codes: int = 4) -> list[dict]:
    """The images the float16 check compares: codes of both concept words in every scene, and no code."""
    return [{"prompt": world.prompt(concept, scene), "seed": 10 * k + s, "concept": concept, "code": k}
            for k in range(n_codes) for concept in experiment.CONCEPTS for s, scene in enumerate(world.SCENES)]


def draw(weights: str, mapper_path: str, scale: experiment.Scale) -> np.ndarray:
    """The probe images (with codes, then without) of a base model file and a mapper file, as uint8."""
    from model.sdxl import SDXL

    model = SDXL.load(weights)
    f = load_mapper(mapper_path)
    jobs = probe_jobs()
    with torch.no_grad():
        words = experiment.code_words(f, jobs)
    coded = experiment.generate(model, jobs, words, scale.steps, scale.guidance)
    plain = experiment.generate(model, jobs, None, scale.steps, scale.guidance)
    return torch.cat([coded, plain]).numpy()


def to_float16(tensors: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    return {k: v.half() if k in names and v.is_floating_point() else v for k, v in tensors.items()}


def shipped_mapper_metadata(meta: dict, work: str, base_file: str) -> dict:
    """The mapper file's own description, made true of the shipped files and free of this machine: the base
    model it names is the shipped base.safetensors (the trained one, parts stored in float16), and the paths
    train.py recorded are written relative to the experiment's work folder ("<work>/data-mapper")."""
    meta = dict(meta)
    settings = json.loads(meta[export.TRAINING_KEY])
    for key in ("data", "weights", "out", "cache_dir"):
        if settings.get(key):
            settings[key] = os.path.join("<work>", os.path.relpath(settings[key], work))
    meta[export.TRAINING_KEY] = json.dumps(settings)
    meta[export.BASE_MODEL_KEY] = json.dumps(export.base_model_identity(base_file))
    return meta


def ship(out: str, work: str, scale_name: str = "full", log=print) -> dict:
    """Make (or reuse) the model, choose each part's precision, write the files and the manifest."""
    scale = experiment.SCALES[scale_name]
    exp = experiment.Experiment(scale, work, os.path.join(work, "figures"), log)
    exp.make_world()
    base_facts = exp.make_base()
    model = exp.load_model()
    judge, judge_facts = exp.make_judge(model)
    run = exp.train_row(experiment.FULL, 0)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".ship")
    os.makedirs(tmp, exist_ok=True)

    # Each part of the base model, and the mapper, in float16 unless that moves an image by more than 1/255.
    base_sd = load_file(exp.weights)
    mapper_file = os.path.join(run, "mapper.safetensors")
    mapper_sd, mapper_meta = load_file(mapper_file), read_metadata(mapper_file)
    reference = draw(exp.weights, mapper_file, scale)
    precision = {}
    for part in (*PARTS, "mapper"):
        trial_base = {k: v for k, v in base_sd.items()}
        trial_mapper = dict(mapper_sd)
        for p, dtype in precision.items():
            if dtype == "float16":
                if p == "mapper":
                    trial_mapper = to_float16(trial_mapper, trial_mapper)
                else:
                    trial_base = to_float16(trial_base, [k for k in trial_base if k.startswith(PREFIX[p])])
        if part == "mapper":
            trial_mapper = to_float16(trial_mapper, trial_mapper)
        else:
            trial_base = to_float16(trial_base, [k for k in trial_base if k.startswith(PREFIX[part])])
        save_file(trial_base, os.path.join(tmp, "base.safetensors"), metadata={"toyworld": "trained from scratch"})
        save_file(trial_mapper, os.path.join(tmp, "mapper.safetensors"), metadata=mapper_meta)
        diff = int(np.abs(draw(os.path.join(tmp, "base.safetensors"), os.path.join(tmp, "mapper.safetensors"), scale)
                          .astype(int) - reference.astype(int)).max())
        precision[part] = "float16" if diff <= 1 else "float32"
        log(f"{part} in float16: images move by at most {diff}/255 -> {precision[part]}")
    for p, dtype in precision.items():
        if dtype == "float16" and p != "mapper":
            base_sd = to_float16(base_sd, [k for k in base_sd if k.startswith(PREFIX[p])])
    if precision["mapper"] == "float16":
        mapper_sd = to_float16(mapper_sd, mapper_sd)
    # The judge: float16 only if it reads every probe image exactly as before.
    judge_sd = {k: v for k, v in judge.state_dict().items()}
    images = torch.from_numpy(reference)
    before = judge.read(images)
    half = judge_lib.Judge()
    half.load_state_dict({k: v.half().float() if v.is_floating_point() else v for k, v in judge_sd.items()})
    after = half.read(images)
    same = bool((before["factors"] == after["factors"]).all() and (before["scene"] == after["scene"]).all())
    precision["judge"] = "float16" if same else "float32"
    if same:
        judge_sd = to_float16(judge_sd, judge_sd)
    log(f"judge in float16: readings {'unchanged' if same else 'changed'} -> {precision['judge']}")

    files = {"base.safetensors": (base_sd, {"toyworld": "the toy world's base model (toyworld/ship.py)"}),
             "judge.safetensors": (judge_sd, {"toyworld": "the toy world's judge (toyworld/judge.py)"}),
             "mapper.safetensors": (mapper_sd, None)}
    command = "python -m toyworld.ship" + (f" --scale {scale_name}" if scale_name != "full" else "")
    manifest = {"command": command + f" --threads {torch.get_num_threads()}", "scale": scale_name,
                # what the bytes depend on besides the code: torch's kernels and summation order, Pillow's rendering
                "torch": torch.__version__, "pillow": PIL.__version__, "threads": torch.get_num_threads(),
                "settings": settings(scale), "sampling": sampling(scale), "words": words(), "precision": precision,
                "judge_accuracy": {"rendered": judge_facts["held_out_rendered"]["person"],
                                   "through_vae": judge_facts["held_out_through_vae"]["person"]},
                "base_facts": {k: v for k, v in base_facts.items() if k != "config"}, "files": {}}
    for name, (tensors, meta) in files.items():
        path = os.path.join(out, name)
        if name == "mapper.safetensors":  # (after base.safetensors, which it names)
            meta = shipped_mapper_metadata(mapper_meta, work, os.path.join(out, "base.safetensors"))
        save_safetensors(path, tensors, meta)  # (metadata sorted: the same content, the same bytes)
        manifest["files"][name] = {"sha256": experiment.file_digest(path), "bytes": os.path.getsize(path)}
    with open(os.path.join(out, "manifest.json.tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(os.path.join(out, "manifest.json.tmp"), os.path.join(out, "manifest.json"))
    for name in os.listdir(tmp):
        os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)
    return manifest


def contact_sheet(path: str, folder: str = OUT, codes={"woman": (1, 2, 3, 4), "man": (5, 6, 7, 8)},
                  seed: int = 0) -> None:
    """The README's picture of the shipped model: a row per code (woman codes, then man codes), a column per
    scene, every image the one `python sample.py --code C --prompt "a photo of a woman on the beach" --seed S`
    draws (sample.py's own functions, the manifest's settings), shown at twice its size."""
    import sample
    from cli import grid_info, labelled_grid
    from model.sdxl import SDXL

    with open(os.path.join(folder, "manifest.json")) as f:
        s = json.load(f)["sampling"]
    model = SDXL.load(os.path.join(folder, "base.safetensors"))
    f = load_mapper(os.path.join(folder, "mapper.safetensors"))
    rows, images = [], []
    for concept, concept_codes in codes.items():
        prompts = [world.prompt(concept, scene) for scene in world.SCENES]
        for code in concept_codes:
            subjects = sample.subjects_from_codes([code], [concept], f, model, torch.float32)
            for prompt in prompts:  # one image per call, as sample.py makes them
                image = model.generate([prompt], [seed], subjects, "", s["steps"], s["guidance"], 0.0, s["width"],
                                       s["height"])[0]
                images.append(image.repeat(2, axis=0).repeat(2, axis=1))
            rows.append(f"code {code} ({concept})")
    sheet = labelled_grid(images, rows, list(world.SCENES), f"the shipped toy model: rows are codes, columns are "
                          f"scenes (seed {seed}, {s['steps']} steps, guidance {s['guidance']})")
    sheet.save(path, pnginfo=grid_info("code", rows, "scene", list(world.SCENES), seed=seed, **s))


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m toyworld.ship", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=OUT, help="where the shipped files go")
    p.add_argument("--work", default=os.path.join(ROOT, "toyworld", "cache"),
                   help="the experiment's cache (shared with python -m toyworld)")
    p.add_argument("--scale", default="full", choices=sorted(experiment.SCALES),
                   help="full: the shipped model; smoke: the plumbing")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads: the files are bit-identical for the same torch, Pillow and thread count")
    p.add_argument("--sheet", default=None,
                   help="only draw the README's contact sheet of the model in --out into this PNG")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sheet:
        contact_sheet(args.sheet, args.out)
        return
    manifest = ship(args.out, args.work, args.scale)
    for name, f in manifest["files"].items():
        print(f"{os.path.join(args.out, name)}  {f['bytes'] / 2**20:.1f} MB  sha256 {f['sha256']}")


if __name__ == "__main__":
    sys.exit(main())
