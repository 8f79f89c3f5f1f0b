"""The paper's evaluation (section 4.2, Tables 1-5): Face Sim, Face Div, CLIP-T, DreamSim.

    python eval.py --mapper runs/cocoins --set portraits --out eval/portraits/   # CoCoIns, Table 1
    python eval.py --mapper runs/cocoins --set scenes --out eval/scenes/         # CoCoIns, Table 2
    python eval.py --no-code --set portraits --out eval/sdxl/                    # plain SDXL
    python eval.py --dataset celeba/ --out eval/celeba/                          # the reference row
    python eval.py --images other_method/ --out eval/other/                      # score only
    torchrun --nproc_per_node=8 eval.py ...                                      # generate on 8 GPUs

Symbols: subject word s ∈ {man, woman, boy, girl, person}; identity k (one code of one subject
word, or one identity of a dataset) has images x_{k,1}, …, x_{k,n_k}; e_{k,i} is the L2-normalised
face embedding of the largest face in x_{k,i} (images with no face are counted and left out).

    Face Sim = mean_k  mean_{i<j} cos(e_{k,i}, e_{k,j})             consistency within an identity
    Face Div = 1 − mean_{k<l} cos(ē_k, ē_l),   ē_k = mean_i e_{k,i}    diversity between identities
    CLIP-T   = mean_{k,i} cos(CLIP_image(x_{k,i}), CLIP_text(prompt_{k,i}))   prompt fidelity (raw cosine)
    DreamSim = mean_k  mean_{i<j} (1 − d(x_{k,i}, x_{k,j}))           whole-image similarity, d = DreamSim distance

Identities with one usable image have no pair and are left out of Face Sim and DreamSim; each
mean is over the identities that have what it needs. Numbers are reported over all identities
of a set and per subject word.

PITFALL: the paper defines Face Div as "the average pairwise similarity between identities" yet
calls it higher-is-better and reports 0.992 for CelebA; only 1 − similarity fits both, so that is
what is computed here. CLIP-T is the raw cosine (the paper's 0.19-0.30), not torchmetrics' 100·cos.

The protocol (section 4.2): Portraits is "A [subject] is looking at the camera." for the five
subject words, Scenes is 1,000 free-form sentences in four settings (prompts/). Each subject word
gets --codes identities of --images-per-code images (defaults 20 × 10 = the paper's 200 images per
subject word, 1,000 per set). Every image has its own seed (see `plan`), the same with or without
codes, so `--no-code` reuses the same prompts and seeds without pseudo-words and groups images by
that index: its Face Sim is the chance similarity of random people, the floor any consistency
method must clear.

Generated images go to OUT/images/<subject>-code<N>/<m>-seed<seed>.png with OUT/images/prompts.json,
the very layout `--images DIR` scores, so images of other methods are scored by the same code.

It reuses the pipeline (model/sdxl.py), the mapper (model/mapper.py) and CLIP's image tower
(model/clip_vision.py).

Read next: toyworld/world.py (the toy world, where these metrics watch CoCoIns train).
"""

import argparse
import functools
import importlib.util
import itertools
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor
from tqdm import tqdm

import cli
from data import PEOPLE, count_concept
from model import attention, checkpoint, clip, clip_vision, speed
from model.errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))

# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def face_similarity(groups: list[Tensor]) -> float:
    """Face Sim: per identity (N_k, D), the mean cosine over its image pairs; then the mean over identities.

    Identities with fewer than two images have no pair and are left out; NaN if none has two."""
    scores = []
    for e in groups:
        if len(e) < 2:
            continue
        e = F.normalize(e.double(), dim=1)
        cos = e @ e.T
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        scores.append(cos[i, j].mean())
    return float(torch.stack(scores).mean()) if scores else float("nan")


def face_diversity(groups: list[Tensor]) -> float:
    """Face Div: 1 − the mean cosine between identity means ē_k (identities without images left out)."""
    means = [F.normalize(e.double(), dim=1).mean(dim=0) for e in groups if len(e)]
    if len(means) < 2:
        return float("nan")
    cos = [F.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(means, 2)]
    return float(1 - torch.stack(cos).mean())


def clip_t(image_embeds: Tensor, text_embeds: Tensor) -> float:
    """CLIP-T: the mean over images of cos(image embedding, its prompt's text embedding); (N, P) each."""
    if not len(image_embeds):
        return float("nan")
    return float(F.cosine_similarity(image_embeds.double(), text_embeds.double(), dim=1).mean())


def dreamsim_similarity(groups: list[Tensor]) -> float:
    """DreamSim similarity from DreamSim embeddings grouped per identity.

    DreamSim's distance is d(x, y) = 1 − cos(f(x), f(y)) of its embeddings f (the `dreamsim`
    package's `forward`), so 1 − d is the cosine of the embeddings, and the per-identity mean over
    pairs followed by the mean over identities is exactly Face Sim's aggregation on f."""
    return face_similarity(groups)


# ----------------------------------------------------------------------------------------------
# Face models: image (H, W, 3) uint8 RGB -> L2-normalised embedding of the largest face, or None
# ----------------------------------------------------------------------------------------------


class DlibFaces:
    """dlib's standard face-recognition recipe, with weights shipped in `face-recognition-models`.

    HOG frontal face detector -> 5-point landmarks -> the face aligned into a 150-px chip (25 %
    padding) -> a ResNet's 128-d descriptor (dlib_face_recognition_resnet_model_v1, 99.38 % on LFW)."""

    name = "dlib"

    def __init__(self):
        try:
            import dlib
        except ImportError:
            raise UserError("--face-model dlib needs dlib; install it with `pip install dlib-bin face-recognition-models`") from None
        # The model files are located without importing the package, whose __init__ needs
        # pkg_resources (gone from recent setuptools) for nothing but finding these files.
        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise UserError("--face-model dlib needs the face-recognition-models package; install it with "
                            "`pip install face-recognition-models`")
        models = os.path.join(spec.submodule_search_locations[0], "models")
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(os.path.join(models, "shape_predictor_5_face_landmarks.dat"))
        self.descriptor = dlib.face_recognition_model_v1(os.path.join(models, "dlib_face_recognition_resnet_model_v1.dat"))
        self.dlib = dlib

    def __call__(self, image: np.ndarray) -> Tensor | None:
        image = np.ascontiguousarray(image)
        # The HOG detector finds faces of about 80 px and up; upsampling small images once (as
        # face_recognition does by default) reaches 40 px faces. 1024 px images need no upsampling.
        upsample = 1 if min(image.shape[:2]) < 640 else 0
        boxes, scores, _ = self.detector.run(image, upsample)
        if not boxes:
            return None
        # The largest face (ties: the most confident detection).
        k = max(range(len(boxes)), key=lambda n: (boxes[n].area(), scores[n]))
        chip = self.dlib.get_face_chip(image, self.landmarks(image, boxes[k]), size=150, padding=0.25)
        e = torch.tensor(list(self.descriptor.compute_face_descriptor(chip)), dtype=torch.float64)
        return F.normalize(e, dim=0)


class ArcFaces:
    """ArcFace as the paper measures it, through insightface's `buffalo_l` pack: the SCRFD-10GF
    detector, 5-point alignment to 112 px, a ResNet-50 ArcFace trained on WebFace600K, 512-d.
    insightface downloads the pack into ~/.insightface on first use."""

    name = "arcface"

    def __init__(self, device: torch.device):
        try:
            from insightface.app import FaceAnalysis
        except ImportError:
            raise UserError("--face-model arcface needs insightface; install it with `pip install insightface "
                            "onnxruntime` (onnxruntime-gpu on CUDA), or use --face-model dlib") from None
        gpu = device.type == "cuda"
        providers = (["CUDAExecutionProvider"] if gpu else []) + ["CPUExecutionProvider"]
        try:
            self.app = FaceAnalysis(name="buffalo_l", allowed_modules=["detection", "recognition"], providers=providers)
            # 640 px detection input: insightface's default for buffalo_l.
            self.app.prepare(ctx_id=(device.index or 0) if gpu else -1, det_size=(640, 640))
        except Exception as e:  # insightface raises bare exceptions for a failed download or a broken pack
            raise UserError(f"insightface could not load its buffalo_l model pack ({e}); download it once with "
                            "network access (it goes to ~/.insightface/models/buffalo_l), or use --face-model dlib") from None

    def __call__(self, image: np.ndarray) -> Tensor | None:
        faces = self.app.get(np.ascontiguousarray(image[:, :, ::-1]))  # insightface takes BGR (OpenCV's order)
        if not faces:
            return None
        face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        return F.normalize(torch.tensor(face.embedding, dtype=torch.float64), dim=0)


def load_face_model(name: str, device: torch.device):
    return DlibFaces() if name == "dlib" else ArcFaces(device)


# ----------------------------------------------------------------------------------------------
# CLIP-T: CLIP ViT-L/14 (model/clip_vision.py), found where users have it
# ----------------------------------------------------------------------------------------------

CLIP_HUB_FOLDER = "models--openai--clip-vit-large-patch14"
MISSING_CLIP = ("no CLIP ViT-L/14 weights found for CLIP-T (looked for openai/clip-vit-large-patch14 in the "
                "Hugging Face cache); download them with `huggingface-cli download openai/clip-vit-large-patch14 "
                "model.safetensors` or pass --clip PATH to that folder or its model.safetensors")


def find_clip_weights() -> str | None:
    """model.safetensors of openai/clip-vit-large-patch14 in the Hugging Face cache, the snapshot
    `refs/main` names first (as model/checkpoint.py finds SDXL)."""
    for snapshot in checkpoint.hub_snapshots(CLIP_HUB_FOLDER):
        if os.path.isfile(os.path.join(snapshot, "model.safetensors")):
            return os.path.join(snapshot, "model.safetensors")
    return None


def load_clip(path: str, device, dtype=torch.float32) -> clip_vision.CLIPModel:
    """CLIP ViT-L/14 from a Hugging Face folder (its model.safetensors) or a .safetensors file."""
    from model.checkpoint import read_shapes, stream_tensors

    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"--clip {path}: no such file" + (" (the folder has no model.safetensors)" if os.path.isdir(path) else "")
                        + "; pass the openai/clip-vit-large-patch14 folder or its model.safetensors")
    shapes = read_shapes(file)
    checkpoint.clip_from_transformers(shapes, f"--clip {path}")  # the one-sentence check, before reading tensors
    sd = dict(stream_tensors(file, list(shapes), device=device, dtype=dtype))
    return checkpoint.build_clip_model(checkpoint.clip_from_transformers(sd, f"--clip {path}"))


@functools.cache
def clip_tokenizer() -> clip.Tokenizer:
    """openai/clip-vit-large-patch14's tokenizer: CLIP's BPE padding with EOS, as SDXL's CLIP-L (read once)."""
    return clip.Tokenizer.bundled(pad="eos")


@torch.no_grad()
def clip_embeddings(model: clip_vision.CLIPModel, images: list[np.ndarray], prompts: list[str], batch: int = 16):
    """(image embeddings (N, P), text embeddings (N, P)) in float32 on the CPU."""
    device = model.visual_projection.weight.device
    tokenizer = clip_tokenizer()
    size = model.vision_config.image_size
    img, txt = [], []
    for n in range(0, len(images), batch):
        pixels = torch.stack([clip_vision.clip_preprocess(x, size) for x in images[n:n + batch]]).to(device)
        img.append(model.encode_image(pixels).float().cpu())
        txt.append(model.encode_text(tokenizer(prompts[n:n + batch]).to(device)).float().cpu())
    return torch.cat(img), torch.cat(txt)


# ----------------------------------------------------------------------------------------------
# DreamSim (optional package)
# ----------------------------------------------------------------------------------------------

NOT_INSTALLED = "not installed"


def load_dreamsim(device):
    """DreamSim's ensemble model and preprocessing from the `dreamsim` package, or None without it."""
    if importlib.util.find_spec("dreamsim") is None:
        return None
    from dreamsim import dreamsim

    model, preprocess = dreamsim(pretrained=True, device=str(device))
    return model, preprocess


@torch.no_grad()
def dreamsim_embeddings(dreamsim_model, images: list[np.ndarray]) -> list[Tensor]:
    model, preprocess = dreamsim_model
    device = next(model.parameters()).device
    # One image at a time; embed() squeezes a batch of one to (D,) in some versions: reshape(-1) either way.
    return [model.embed(preprocess(Image.fromarray(x)).to(device)).reshape(-1).double().cpu() for x in images]


# ----------------------------------------------------------------------------------------------
# Prompt sets (prompts/)
# ----------------------------------------------------------------------------------------------

PROMPT_SETS = {"portraits": os.path.join(ROOT, "prompts", "portraits.txt"),
               "scenes": os.path.join(ROOT, "prompts", "scenes.jsonl")}


def load_prompt_set(name_or_path: str) -> dict[str, list[str]]:
    """subject word -> its prompts, from a set's file: `.txt`, one prompt per line, each naming
    exactly one subject word; or `.jsonl`, {"subject": ..., "prompt": ...} per line.

    Every line is checked before anything is generated: a prompt must name its subject word
    exactly once (the pseudo-word goes before it) and no other subject word."""
    path = PROMPT_SETS.get(name_or_path, name_or_path)
    if not os.path.isfile(path):
        raise UserError(f"--set {name_or_path}: not portraits, scenes or a prompt file")
    prompts: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as f:
        lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    for n, line in lines:
        where = f"{path} line {n}"
        if path.endswith(".jsonl"):
            try:
                record = json.loads(line)
                subject, prompt = record["subject"], record["prompt"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{where} is not a JSON object with \"subject\" and \"prompt\"") from None
            if subject not in PEOPLE:
                raise UserError(f"{where}: subject {subject!r} is not one of {', '.join(PEOPLE)}")
        else:
            prompt = line
            named = [s for s in PEOPLE if count_concept(prompt, s)]
            subject = named[0] if len(named) == 1 else None
            if subject is None:
                raise UserError(f"{where} ({prompt!r}) must name exactly one subject word of {', '.join(PEOPLE)}")
        if count_concept(prompt, subject) != 1:
            raise UserError(f"{where} ({prompt!r}) must name its subject word {subject!r} exactly once")
        others = [s for s in PEOPLE if s != subject and count_concept(prompt, s)]
        if others:
            raise UserError(f"{where} ({prompt!r}) names {others[0]!r} besides its subject word {subject!r}")
        prompts.setdefault(subject, []).append(prompt)
    return prompts


@dataclass
class Job:
    """One image to generate."""

    subject: str  # subject word, the concept the pseudo-word is inserted before
    identity: str  # folder name: "<subject>-code<code>" (or "<subject>-group<k>" for --no-code)
    index: int  # m, the image's place within its identity
    code: int | None  # CoCoIns code (None: plain SDXL)
    seed: int
    prompt: str

    @property
    def path(self) -> str:  # relative to OUT/images
        return f"{self.identity}/{self.index:03d}-seed{self.seed}.png"


def plan(prompts: dict[str, list[str]], codes: int, images_per_code: int, use_codes: bool = True) -> list[Job]:
    """Every image of a set: subject word s (in data.PEOPLE's order), identity k < codes, image m.

    code = codes·s + k: one integer per identity, different across subject words;
    seed = (s·codes + k)·images_per_code + m: every image has its own noise, the same with or
        without codes, so --no-code differs from a CoCoIns run only by the pseudo-words;
    prompt = the subject word's prompts[(m·codes + k) mod P]: an identity's images take prompts
        spread over the whole list (Scenes: over all four settings), and the set's images cover
        every prompt before any repeats (20 × 10 = 200 = Scenes' 200 prompts per subject word)."""
    jobs = []
    for s, subject in enumerate(w for w in PEOPLE if w in prompts):
        ps = prompts[subject]
        for k in range(codes):
            code = codes * s + k
            identity = f"{subject}-code{code}" if use_codes else f"{subject}-group{k}"
            for m in range(images_per_code):
                seed = (s * codes + k) * images_per_code + m
                jobs.append(Job(subject, identity, m, code if use_codes else None, seed, ps[(m * codes + k) % len(ps)]))
    return jobs


# ----------------------------------------------------------------------------------------------
# Generation: batched, resumable, split over torchrun processes
# ----------------------------------------------------------------------------------------------


def file_digest(path: str) -> str:
    """SHA-256 of a file (a mapper is a few MB): a mapper retrained in place is a new mapper."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def image_settings(args, weights: str, dtype: str, mapper_sha: str | None, job: Job) -> dict:
    """Everything that decides an image's pixels, stored in its PNG: a rerun with the same
    settings finds them and skips the image. (SDXL's 7 GB are named by path, not hashed.)"""
    return dict(prompt=job.prompt, seed=job.seed, code=job.code, concept=job.subject if job.code is not None else None,
                steps=args.steps, guidance=args.guidance, eta=args.eta, width=args.width, height=args.height,
                weights=os.path.abspath(weights), vae=args.vae and os.path.abspath(args.vae),
                mapper_sha256=mapper_sha if job.code is not None else None, dtype=dtype)


def already_made(path: str, settings: dict) -> bool:
    try:
        with Image.open(path) as im:
            return json.loads(im.text.get("parameters", "null")) == settings
    except (OSError, ValueError):  # missing, truncated by a killed run, or not ours
        return False


def generate(args, jobs: list[Job], images_dir: str, weights: str, device, dtype, rank=0, world=1) -> int:
    """Make the images of `jobs` this process owns (every world-th) that are not on disk yet; returns how many."""
    from model import mapper
    from model.sdxl import SDXL

    mine = jobs[rank::world]
    mapper_sha = file_digest(mapper_path(args)) if any(job.code is not None for job in mine) else None
    todo = []
    for job in mine:
        settings = image_settings(args, weights, str(dtype).replace("torch.", ""), mapper_sha, job)
        if not already_made(os.path.join(images_dir, job.path), settings):
            todo.append((job, settings))
    if not todo:
        return 0
    model = SDXL.load(weights, device=device, dtype=dtype, vae_path=args.vae)
    speed.save_memory(model.unet, model.vae)
    if args.compile:
        speed.compile(model, args.compile)
    f = None
    if mapper_sha is not None:
        f = checkpoint.load_mapper(mapper_path(args), device=device)
        cli.check_mapper_fits(f, model)
    for n in tqdm(range(0, len(todo), args.batch_size), desc=f"generating (process {rank})" if world > 1 else "generating",
                  unit="batch", position=rank):
        batch = todo[n:n + args.batch_size]
        subjects = None
        if f is not None:
            # z_k from code k (model/mapper.py), then w = f(z): one pseudo-word pair per image.
            z = torch.stack([mapper.code_to_z(job.code, f.config.z_dim) for job, _ in batch]).to(device)
            w_l, w_g = f(z)
            subjects = [(w_l, w_g, [job.subject for job, _ in batch])]
        # A batch at a time, each image saved as soon as its batch is made: a stopped run keeps them.
        images = model.generate([j.prompt for j, _ in batch], [j.seed for j, _ in batch], subjects, steps=args.steps,
                                guidance=args.guidance, eta=args.eta, width=args.width, height=args.height,
                                batch_size=args.batch_size)
        for (job, settings), img in zip(batch, images):
            path = os.path.join(images_dir, job.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            info = PngInfo()
            info.add_text("parameters", json.dumps(settings))
            # Written under a temporary name and renamed: a killed run never leaves half a PNG
            # that a rerun would take for a finished image.
            Image.fromarray(img).save(path + ".tmp", format="PNG", pnginfo=info)
            os.replace(path + ".tmp", path)
    return len(todo)


def mapper_path(args) -> str:
    return cli.mapper_file(args.mapper, instead=" with --mapper, or use --no-code for plain SDXL")


def write_prompts_json(images_dir: str, jobs: list[Job]) -> None:
    with open(os.path.join(images_dir, "prompts.json"), "w", encoding="utf-8") as f:
        json.dump({job.path: job.prompt for job in jobs}, f, indent=1)


# ----------------------------------------------------------------------------------------------
# What is scored: identity folders, generated or given, or a dataset
# ----------------------------------------------------------------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Identity:
    name: str  # folder or dataset identity
    subject: str | None  # subject word, when the name starts with one ("woman-code3")
    paths: list[str]  # image files
    prompts: list[str | None]  # each image's prompt (None: unknown, no CLIP-T)


def subject_of(name: str) -> str | None:
    head = name.split("-")[0].lower()
    return head if head in PEOPLE else None


def read_image_folder(folder: str) -> list[Identity]:
    """DIR/<identity>/<anything>.png (+ DIR/prompts.json: image path relative to DIR -> prompt)."""
    if not os.path.isdir(folder):
        raise UserError(f"--images {folder} is not a folder")
    prompts = {}
    if os.path.isfile(os.path.join(folder, "prompts.json")):
        try:
            with open(os.path.join(folder, "prompts.json"), encoding="utf-8") as f:
                prompts = {k.replace(os.sep, "/"): v for k, v in json.load(f).items()}
        except (ValueError, AttributeError):
            raise UserError(f"{folder}/prompts.json is not a JSON object mapping image paths to prompts") from None
    identities = []
    for name in sorted(os.listdir(folder)):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            continue
        files = sorted(p for p in os.listdir(sub) if p.lower().endswith(IMAGE_SUFFIXES))
        if files:
            identities.append(Identity(name, subject_of(name), [os.path.join(sub, p) for p in files],
                                       [prompts.get(f"{name}/{p}") for p in files]))
    if not identities:
        raise UserError(f"--images {folder} has no identity sub-folders of images; lay it out as "
                        f"{folder}/<identity>/<image>.png, one folder per identity")
    return identities


def read_celeba(root: str, identities: int, per_identity: int, seed: int = 0) -> list[Identity]:
    """`identities` CelebA identities with at least `per_identity` images each (identity_CelebA.txt),
    drawn with a fixed seed, and their first `per_identity` images; captions from a captions.jsonl
    beside the images when there is one (CLIP-T needs them), else no prompts."""
    found = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == "identity_CelebA.txt" or name.lower().endswith((".jpg", ".png")):
                found.setdefault(name, os.path.join(dirpath, name))
    if "identity_CelebA.txt" not in found:
        raise UserError(f"--dataset {root} has no identity_CelebA.txt (CelebA's Anno/ file that names each image's identity)")
    people: dict[str, list[str]] = {}
    with open(found["identity_CelebA.txt"]) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 2 and parts[0] in found:
                people.setdefault(parts[1], []).append(parts[0])
    eligible = sorted((p for p, imgs in people.items() if len(imgs) >= per_identity), key=int)
    if len(eligible) < 2:
        raise UserError(f"--dataset {root}: fewer than two identities have {per_identity} images; lower --images-per-code")
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(eligible, size=min(identities, len(eligible)), replace=False).tolist(), key=int)
    captions = {}
    for dirpath, _, files in os.walk(root):
        if "captions.jsonl" in files:
            with open(os.path.join(dirpath, "captions.jsonl"), encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        record = json.loads(line)
                        captions[os.path.basename(record["image"])] = record["captions"][0]
    return [Identity(p, None, [found[n] for n in sorted(people[p])[:per_identity]],
                     [captions.get(n) for n in sorted(people[p])[:per_identity]]) for p in chosen]


# ----------------------------------------------------------------------------------------------
# Scoring and the report
# ----------------------------------------------------------------------------------------------


def read_rgb(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def score(identities: list[Identity], face_model, clip_model=None, dreamsim_model=None) -> dict:
    """Every metric over all identities and per subject word; plus per-identity counts."""
    faces, dreamsim, no_face = {}, {}, []
    image_embeds, text_embeds, owners = [], [], []
    for ident in tqdm(identities, desc="scoring", unit="identity"):
        images = [read_rgb(p) for p in ident.paths]
        found = []
        for path, img in zip(ident.paths, images):
            e = face_model(img)
            if e is None:
                no_face.append(path)
            else:
                found.append(e)
        faces[ident.name] = torch.stack(found) if found else torch.zeros(0, 1, dtype=torch.float64)
        if dreamsim_model is not None:
            dreamsim[ident.name] = torch.stack(dreamsim_embeddings(dreamsim_model, images))
        with_prompt = [(img, p) for img, p in zip(images, ident.prompts) if p is not None]
        if clip_model is not None and with_prompt:
            i, t = clip_embeddings(clip_model, *map(list, zip(*with_prompt)))
            image_embeds.append(i)
            text_embeds.append(t)
            owners += [ident.name] * len(i)

    no_face_set = set(no_face)

    def metrics(names: set[str]) -> dict:
        chosen = [faces[n] for n in faces if n in names]
        row = {"identities": len(chosen), "images": sum(len(i.paths) for i in identities if i.name in names),
               "no_face": sum(1 for i in identities if i.name in names for p in i.paths if p in no_face_set),
               "face_sim": face_similarity(chosen), "face_div": face_diversity(chosen)}
        if image_embeds:
            keep = torch.tensor([o in names for o in owners])
            row["clip_t"] = clip_t(torch.cat(image_embeds)[keep], torch.cat(text_embeds)[keep])
        else:  # --images without prompts.json, a dataset without captions
            row["clip_t"] = "no prompts"
        row["dreamsim"] = dreamsim_similarity([dreamsim[n] for n in dreamsim if n in names]) if dreamsim_model else NOT_INSTALLED
        return row

    result = {"all": metrics({i.name for i in identities})}
    for subject in PEOPLE:
        names = {i.name for i in identities if i.subject == subject}
        if names:
            result[subject] = metrics(names)
    return {"rows": result, "no_face_images": sorted(os.path.relpath(p) for p in no_face),
            "faces_per_identity": {n: len(e) for n, e in faces.items()}}


def contact_sheets(identities: list[Identity], out: str, thumb: int = 128) -> list[str]:
    """One sheet per subject word (or one for all): rows = identities (codes), columns = images."""
    groups: dict[str, list[Identity]] = {}
    for ident in identities:
        groups.setdefault(ident.subject or "all", []).append(ident)
    paths = []
    for subject, idents in groups.items():
        cols = max(len(i.paths) for i in idents)
        sheet = Image.new("RGB", (cols * thumb, len(idents) * thumb), "white")
        for r, ident in enumerate(idents):
            for c, path in enumerate(ident.paths):
                with Image.open(path) as im:
                    sheet.paste(im.convert("RGB").resize((thumb, thumb), Image.BICUBIC), (c * thumb, r * thumb))
        path = os.path.join(out, f"contact_{subject}.png")
        sheet.save(path)
        paths.append(path)
    return paths


def fmt(x) -> str:
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return "n/a" if x != x else f"{x:.3f}"  # NaN: nothing to measure (e.g. no faces found)


def table(rows: dict) -> str:
    lines = ["| | images | no face | Face Sim ↑ | Face Div ↑ | CLIP-T ↑ | DreamSim ↑ |", "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['images']} | {r['no_face']} | {fmt(r['face_sim'])} | {fmt(r['face_div'])} | "
                     f"{fmt(r['clip_t'])} | {fmt(r['dreamsim'])} |")
    return "\n".join(lines)


def write_report(out: str, result: dict, settings: dict, sheets: list[str]) -> None:
    def clean(x):  # JSON has no NaN: a metric with nothing to measure is null
        return {k: clean(v) for k, v in x.items()} if isinstance(x, dict) else (None if x != x else x)

    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(clean({"settings": settings, **result}), f, indent=1)
    all_row = result["rows"]["all"]
    lines = [
        "# Evaluation report", "",
        table(result["rows"]), "",
        f"{all_row['no_face']} of {all_row['images']} images had no detectable face ({settings['face_model']}) "
        "and are left out of Face Sim and Face Div.", "",
        "Face Sim: mean cosine over each identity's image pairs, averaged over identities. "
        "Face Div: 1 − mean cosine between identity means. CLIP-T: raw cosine of CLIP ViT-L/14 image and text "
        "embeddings. DreamSim: mean 1 − DreamSim distance over each identity's image pairs.", "",
        "## Settings", "", "```", json.dumps(settings, indent=1), "```", "",
        "## Contact sheets (rows = identities, columns = images)", "",
    ] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in sheets]
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--set", default="portraits", help="prompt set: portraits, scenes, or a prompt file (.txt or .jsonl)")
    what.add_argument("--images", default=None, help="only score DIR/<identity>/<image>.png (+ DIR/prompts.json for CLIP-T)")
    what.add_argument("--dataset", default=None, help="score a CelebA folder (identities from identity_CelebA.txt): the reference row")
    p.add_argument("--out", default="eval", help="OUT: images/, metrics.json, report.md, contact sheets")
    p.add_argument("--mapper", default=os.path.join(ROOT, "weights", "mapper.safetensors"),
                   help="trained CoCoIns mapper: the file or a train.py run folder")
    p.add_argument("--no-code", action="store_true", help="plain SDXL: the same prompts and seeds without pseudo-words")
    # 20 × 10 per subject word = the paper's 200 images per subject word, 1,000 per set.
    p.add_argument("--codes", type=int, default=20, help="identities per subject word (--dataset: 5× this many identities)")
    p.add_argument("--images-per-code", type=int, default=10, help="images per identity")
    p.add_argument("--batch-size", type=int, default=4, help="images per UNet batch")
    p.add_argument("--face-model", default="arcface", choices=["arcface", "dlib"], help="face embedder (the paper: arcface)")
    p.add_argument("--clip", default=None, help="CLIP ViT-L/14 for CLIP-T: openai/clip-vit-large-patch14 folder or "
                                                 "model.safetensors (default: the Hugging Face cache)")
    # Generation, as sample.py's flags.
    p.add_argument("--weights", default=None, help="SDXL single file or diffusers folder (default: as sample.py)")
    p.add_argument("--vae", default=None, help="replacement VAE (file or diffusers folder)")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (torchrun: each process its LOCAL_RANK GPU)")
    p.add_argument("--dtype", default="auto", choices=cli.DTYPES, help=cli.DTYPE_HELP)
    p.add_argument("--attention", default="auto", choices=list(attention.BACKENDS), help="attention kernel")
    p.add_argument("--compile", nargs="?", const="regional", default=None, choices=speed.COMPILE_MODES,
                   help="torch.compile the UNet (as sample.py)")
    return p.parse_args(argv)


def check_numbers(args) -> None:
    from model import ddim

    for flag, value in (("--codes", args.codes), ("--images-per-code", args.images_per_code), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} {value}: use a positive whole number")
    if args.images_per_code < 2:
        raise UserError("--images-per-code 1 gives every identity a single image and Face Sim nothing to compare; use 2 or more")
    ddim.check_steps(args.steps)
    ddim.check_eta(args.eta)
    cli.check_size(args.width, args.height)


def main(argv=None) -> dict:
    args = parse_args(argv)
    with cli.torchrun_processes(cli.pick_device(args.device)) as (device, rank, world):
        return evaluate(args, device, rank, world)


def evaluate(args, device: torch.device, rank: int, world: int) -> dict:
    """Generate (each torchrun process its share), then score on rank 0; the result on rank 0, {} on the others."""
    dtype = cli.pick_dtype(args.dtype, device)
    attention.set_backend(args.attention)
    check_numbers(args)
    os.makedirs(args.out, exist_ok=True)

    # Everything that can fail is checked before the first image: the prompt set or the folders,
    # the mapper, the weights, the face model, CLIP.
    jobs, weights, identities = [], None, None
    if args.images is not None:
        identities = read_image_folder(args.images)
    elif args.dataset is not None:
        identities = read_celeba(args.dataset, 5 * args.codes, args.images_per_code)
    else:
        jobs = plan(load_prompt_set(args.set), args.codes, args.images_per_code, use_codes=not args.no_code)
        if not args.no_code:
            mapper_path(args)
        from model.checkpoint import MISSING_WEIGHTS, find_default_weights

        weights = args.weights or find_default_weights()
        if weights is None:
            raise UserError(MISSING_WEIGHTS)
    face_model = clip_model = dreamsim_model = clip_path = None
    if rank == 0:  # torchrun: the other processes only generate
        face_model = load_face_model(args.face_model, device)
        if jobs or any(p is not None for i in identities for p in i.prompts):
            clip_path = args.clip or find_clip_weights()
            if clip_path is None:
                raise UserError(MISSING_CLIP)
            clip_model = load_clip(clip_path, device)  # float32: CLIP-T to the digit
        dreamsim_model = load_dreamsim(device)

    images_dir = os.path.join(args.out, "images")
    made = 0
    if jobs:
        os.makedirs(images_dir, exist_ok=True)
        made = generate(args, jobs, images_dir, weights, device, dtype, rank, world)
        if world > 1:
            # The sum over processes; and since all_reduce waits for every process, every image
            # is on disk before rank 0 scores them.
            count = torch.tensor([made], device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(count)
            made = int(count)
    if rank != 0:
        return {}
    if jobs:
        write_prompts_json(images_dir, jobs)
        identities = read_image_folder(images_dir)
    result = score(identities, face_model, clip_model, dreamsim_model)
    settings = {k: v for k, v in vars(args).items()}
    settings.update(weights=weights, clip=clip_path, generated=made, dtype=str(dtype).replace("torch.", ""), mode=(
        "images" if args.images else "dataset" if args.dataset else "plain SDXL" if args.no_code else "CoCoIns"))
    sheets = contact_sheets(identities, args.out)
    write_report(args.out, result, settings, sheets)
    print(table(result["rows"]))
    print(f"{result['rows']['all']['no_face']} images without a detectable face; "
          f"{os.path.join(args.out, 'metrics.json')}, {os.path.join(args.out, 'report.md')}")
    return result


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
