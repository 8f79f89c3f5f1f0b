"""Generate images with SDXL, optionally with a CoCoIns subject code.

    python sample.py --code 42 --prompt "a woman reading"
    python sample.py --code 42 --prompt "a woman reading" --prompt "a woman surfing" --num-images 4
    python sample.py --prompt "a lighthouse at dawn"                    # plain SDXL, no code
    python sample.py --code 42 --save-embedding person42.safetensors    # code 42 for other SDXL tools
    python sample.py --mapper runs/cocoins --info                       # what a mapper file is

The same --code gives the same person in any prompt and on any seed. Every image is saved as a
PNG carrying its full generation parameters as PNG text; several images also get a labelled contact
sheet (rows = prompts, columns = seeds), the paper's way of showing one subject everywhere.

It only parses flags and calls model/sdxl.py and model/mapper.py.

Read next: eval.py (measuring whether a code keeps its person).
"""

import argparse
import json
import os
import shlex
import sys

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cli import (DTYPE_HELP, DTYPES, HelpFormatter, check_mapper_fits, check_size, grid_info, labelled_grid,
                 mapper_file, pick_device, pick_dtype)
from data import PEOPLE
from model import attention, checkpoint, ddim, export, speed
from model.errors import UserError

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MAPPER = os.path.join(ROOT, "weights", "mapper.safetensors")
# What a setting the user leaves out is, for SDXL (the toy model's own are in its manifest).
SDXL_DEFAULTS = {"width": 1024, "height": 1024, "steps": 30, "guidance": 5.0}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--prompt", action="append", help="text prompt (repeat for several); needed to draw, not for "
                   "--save-embedding or --info")
    p.add_argument("--negative-prompt", default="", help="negative prompt; empty = SDXL base's zero conditioning")
    p.add_argument("--code", type=int, action="append", default=[], help="CoCoIns subject code (repeat for several subjects)")
    p.add_argument("--concept", action="append", default=[], help="concept word each --code instantiates, in order; a word named twice goes before its occurrences in order (default: the words %s as the first prompt names them)" % "/".join(PEOPLE))
    p.add_argument("--seed", type=int, action="append", default=None, help="noise seed (repeat for several; default 0)")
    p.add_argument("--num-images", type=int, default=None, help="images per prompt, seeds counting up from the first --seed")
    p.add_argument("--batch-size", type=int, default=1, help="images per UNet batch: faster on a GPU or for small models; "
                   "each image equals the one drawn alone to within 1/255 (float rounding of batched kernels)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 30; the toy model's 20)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: 5; the toy model's 3)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic DDIM, 1 = DDPM-like)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8 (default: 1024, as SDXL was trained near 1024 x 1024 pixels in all; the toy model's 64)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 (default: 1024; the toy model's 64)")
    p.add_argument("--weights", default=None, help="SDXL single .safetensors file or diffusers folder (default: weights/sd_xl_base_1.0.safetensors, else the Hugging Face cache, else the toy model in weights/toy/)")
    p.add_argument("--vae", default=None, help="replacement VAE (file or diffusers folder), e.g. the fp16-fix VAE")
    p.add_argument("--mapper", default=None, help="trained CoCoIns mapper: the file, or a train.py run folder (default: weights/mapper.safetensors in this project; with the toy model, its own)")
    p.add_argument("--save-embedding", default=None, metavar="FILE.safetensors",
                   help="write each --code as an SDXL textual-inversion embedding (clip_l, clip_g) for diffusers, "
                        "AUTOMATIC1111/Forge and ComfyUI; {code} in the name stands for the code; needs only the "
                        "mapper (draws too when --prompt is given)")
    p.add_argument("--info", action="store_true",
                   help="print what the --mapper file records (base model, concepts, training settings, steps, "
                        "version) and exit")
    p.add_argument("--out", default="out", help="a .png file (one image) or a folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    p.add_argument("--attention", default="auto", choices=list(attention.BACKENDS), help="attention kernel")
    p.add_argument("--compile", nargs="?", const="regional", default=None, choices=speed.COMPILE_MODES,
                   help="torch.compile: alone or `regional`, the UNet's repeated blocks (seconds to compile); "
                        "`full`, the whole UNet and the VAE decoder (minutes to compile, fastest after)")
    p.add_argument("--offload", action="store_true",
                   help="keep the models in CPU memory and move each to the GPU only while it runs (small GPUs)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay a recorded CUDA graph of the UNet step instead of launching its kernels one by one "
                        "(CUDA only, not with --offload; alone or with --compile)")
    return p.parse_args(argv)


def toy_dir() -> str:
    """The toy model this project ships (toyworld/ship.py), in weights/toy/: what draws without SDXL."""
    return os.path.join(checkpoint.WEIGHTS_DIR, "toy")


def toy_manifest(folder: str | None = None) -> dict | None:
    """The shipped toy model's manifest (weights/toy/manifest.json, or in `folder`), or None where it is not there."""
    path = os.path.join(folder or toy_dir(), "manifest.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def toy_note(toy: dict) -> str:
    """The one line that says the toy model draws, what it is, and how to get SDXL."""
    s, w = toy["sampling"], toy["words"]
    return (f"no SDXL weights found, so this draws with the toy model in weights/toy/ ({s['width']} x {s['height']} "
            f"px people trained from scratch on a CPU; it knows {', '.join(w['concepts'])} in "
            f"{', '.join(w['scenes'])}); for SDXL run `python weights/download.py` (6.9 GB) or pass --weights")


def choose_model(args, say=True):
    """The base model that draws: --weights, else SDXL found on this machine, else the shipped toy model
    (said in one line). Fills in the mapper and the size, steps and guidance the user left out: the toy
    model's own from its manifest, or SDXL's. Returns (weights, the toy manifest or None)."""
    from model.checkpoint import MISSING_WEIGHTS, find_default_weights

    weights, toy, folder = args.weights or find_default_weights(), None, toy_dir()
    if weights is None:
        toy = toy_manifest(folder)
        if toy is None:
            raise UserError(MISSING_WEIGHTS)
        weights = os.path.join(folder, "base.safetensors")
        if say:
            print(toy_note(toy), file=sys.stderr)
    elif os.path.isfile(weights):
        # the toy model named by its file (--weights weights/toy/base.safetensors): its own settings too
        folder = os.path.dirname(os.path.abspath(weights))
        manifest = toy_manifest(folder)
        if manifest and os.path.basename(weights) in manifest.get("files", {}):
            toy = manifest
    for name, value in (toy["sampling"] if toy else SDXL_DEFAULTS).items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.mapper is None:
        args.mapper = os.path.join(folder, "mapper.safetensors") if toy else DEFAULT_MAPPER
    return weights, toy


def seeds_from(args) -> list[int]:
    seeds = args.seed or [0]
    if args.num_images is not None:
        if args.num_images < 1:
            raise UserError(f"--num-images {args.num_images}: ask for at least one image")
        if len(seeds) > 1:
            raise UserError("give either several --seed values or --num-images, not both")
        seeds = [seeds[0] + k for k in range(args.num_images)]
    for seed in seeds:
        if not 0 <= seed < 2**64:  # torch.Generator's range
            raise UserError(f"--seed {seed}: a seed is a whole number from 0 to 2**64 - 1")
    return seeds


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def output_paths(out: str, n: int, names: list[str]) -> list[str]:
    """Where the images go, the folder made and checked writable now, before anything loads."""
    if out.lower().endswith(IMAGE_SUFFIXES):
        raise UserError(f"--out {out}: images are written as PNG (with their parameters inside); name a .png file "
                        f"or a folder")
    one_file = out.lower().endswith(".png")
    if one_file and n > 1:
        raise UserError(f"--out {out} names one file but {n} images were asked for; pass a folder instead")
    if one_file and os.path.isdir(out):
        raise UserError(f"--out {out} is a folder; name a file or drop the .png")
    if not one_file and os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} is a file, not a folder; name a folder for the images (or a .png for one image)")
    folder = (os.path.dirname(out) or ".") if one_file else out
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create the folder {folder} ({e.strerror}); choose another --out") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"--out {out}: the folder {folder} is not writable; choose another --out")
    return [out] if one_file else [os.path.join(out, name) for name in names]


def subject_concepts(args, prompts) -> list[str]:
    """Check --code/--concept/--mapper before any weights load; return one concept per code.

    Concept words are looked up as CLIP tokens, as the pseudo-words will be inserted: "a woman's
    portrait", "(woman)" and "woman-astronaut" all contain "woman". Without --concept, the concept
    words of the first prompt are taken in the order they appear there ("a man and a woman":
    the first --code is the man; "a man talking to another man": the first --code is the first
    man); every prompt must contain every concept, once per code that names it."""
    from model import clip, mapper

    if not args.code:
        if args.concept:
            raise UserError("--concept needs a --code to instantiate it")
        return []
    for code in args.code:
        mapper.code_to_z(code, 1)  # the code's range, in one sentence
    if args.concept and len(args.concept) != len(args.code):
        raise UserError(f"{len(args.code)} --code but {len(args.concept)} --concept given; give one concept per code, or none")
    tokenizer = clip.Tokenizer.bundled(pad="eos")
    ids = tokenizer(prompts)

    concepts = list(args.concept)
    if not concepts:
        found = []  # (position, word) of every occurrence of a concept word in the first prompt
        for word in PEOPLE:  # the concept words a people mapper is trained on
            for occurrence in range(clip.CONTEXT_LENGTH):
                try:
                    found.append((mapper.find_concept(ids[0].tolist(), tokenizer.encode(word), word=word,
                                                      prompt=prompts[0], occurrence=occurrence), word))
                except UserError:  # no further occurrence
                    break
        if len(found) < len(args.code):
            raise UserError(
                f"found {len(found)} concept word(s) ({', '.join(PEOPLE)}) in the prompt {prompts[0]!r} "
                f"for {len(args.code)} --code; name one per code with --concept WORD"
            )
        concepts = [word for _, word in sorted(found)[: len(args.code)]]
    # A dry run of the insertion on 1-wide token embeddings: the positions and checks of the real
    # one (every concept in every prompt, an occurrence per subject, room within CLIP's 77 tokens).
    e = torch.zeros(len(prompts), clip.CONTEXT_LENGTH, 1)
    mapper.insert_subjects(e, clip.eos_positions(ids), ids, tokenizer, [(torch.zeros(1), c) for c in concepts], prompts)
    return concepts


def subjects_from_codes(codes, concepts, f, model, dtype):
    """CoCoIns: each code -> z -> the mapper's pseudo-words, paired with its concept word."""
    from model import mapper

    check_mapper_fits(f, model)
    device = model.device
    f = f.to(device)
    subjects = []
    for code, concept in zip(codes, concepts):
        z = mapper.code_to_z(code, f.config.z_dim).to(device)
        w_l, w_g = f(z[None])
        subjects.append((w_l[0].to(dtype), w_g[0].to(dtype), concept))
    return subjects


def embedding_concepts(args, path: str) -> list[str]:
    """The concept word each exported code goes before: --concept, else the prompt's (found as for
    drawing), else the words the mapper file records it was trained on."""
    if args.prompt:
        return subject_concepts(args, args.prompt)
    if args.concept:
        if len(args.concept) != len(args.code):
            raise UserError(f"{len(args.code)} --code but {len(args.concept)} --concept given; give one concept per "
                            f"code, or none")
        return list(args.concept)
    trained = export.read_mapper_info(path).concepts
    if not trained:
        raise UserError(f"{path} does not record the concept words it was trained on; name the word the "
                        f"embedding goes before with --concept WORD")
    return [", ".join(trained)] * len(args.code)


def save_embeddings(args) -> None:
    """--save-embedding: each code's two pseudo-words as an SDXL embedding file, from the mapper alone."""
    if not args.code:
        raise UserError("--save-embedding needs a --code (it writes one file per code)")
    paths = export.embedding_paths(args.save_embedding, args.code)
    path = mapper_file(args.mapper)
    export.save_embeddings(path, args.code, embedding_concepts(args, path), paths)
    for file in paths:
        print(file)


def main(argv=None):
    args = parse_args(argv)
    from model.sdxl import SDXL

    # What needs the mapper alone comes first, and needs no prompt and no SDXL.
    if args.mapper is None and (args.info or args.save_embedding):
        args.mapper = DEFAULT_MAPPER if os.path.isfile(DEFAULT_MAPPER) or toy_manifest() is None else (
            os.path.join(toy_dir(), "mapper.safetensors"))
    if args.info:
        print(export.format_info(export.read_mapper_info(mapper_file(args.mapper))))
        return
    if args.save_embedding:
        save_embeddings(args)
        if not args.prompt:
            return
    prompts = args.prompt
    if not prompts:
        raise UserError("give a --prompt to draw (--save-embedding and --info need none)")
    if any(not p.strip() for p in prompts):
        raise UserError("every --prompt must be non-empty text")
    weights, toy = choose_model(args)
    check_size(args.width, args.height)
    seeds = seeds_from(args)
    if args.batch_size < 1:
        raise UserError(f"--batch-size {args.batch_size}: a batch holds at least one image")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    attention.set_backend(args.attention)
    # Check what can be checked before spending a minute loading 7 GB.
    if args.cuda_graphs:
        speed.check_cuda_graphs(device, args.offload)
    ddim.check_steps(args.steps)
    ddim.check_eta(args.eta)
    concepts = subject_concepts(args, prompts)
    f = None
    if args.code:
        # a few MB: read now, to fail before the big load
        file = mapper_file(args.mapper, instead=" with --mapper, or copy it to weights/mapper.safetensors")
        f = checkpoint.load_mapper(file)
        warning = export.base_model_warning(file, weights)  # never a refusal
        if warning:
            print(warning, file=sys.stderr)

    names = [f"{i:03d}-seed{s}" + "".join(f"-code{c}" for c in args.code) + ".png"
             for i, (p, s) in enumerate((p, s) for p in prompts for s in seeds)]
    paths = output_paths(args.out, len(names), names)

    print(f"loading SDXL from {weights} on {device} ({str(dtype).replace('torch.', '')})", file=sys.stderr)
    model = SDXL.load(weights, device="cpu" if args.offload else device, dtype=dtype, vae_path=args.vae)
    speed.save_memory(model.unet, model.vae)
    if args.offload:
        speed.enable_offload(model, device)
    if args.compile:
        speed.compile(model, args.compile)
    if args.cuda_graphs:
        speed.enable_cuda_graphs(model)
    subjects = subjects_from_codes(args.code, concepts, f, model, dtype) if args.code else None

    jobs = [(prompt, seed) for prompt in prompts for seed in seeds]
    images = []
    for start in range(0, len(jobs), args.batch_size):
        # --batch-size images per call (one by default), saved as soon as they are made
        batch = jobs[start:start + args.batch_size]
        drawn = model.generate([p for p, _ in batch], [s for _, s in batch], subjects, args.negative_prompt, args.steps,
                               args.guidance, args.eta, args.width, args.height, batch_size=len(batch), progress=True)
        for (prompt, seed), img in zip(batch, drawn):
            k = len(images)
            params = dict(prompt=prompt, negative_prompt=args.negative_prompt, seed=seed, steps=args.steps,
                          guidance=args.guidance, eta=args.eta, width=args.width, height=args.height,
                          code=args.code, concept=[s[2] for s in subjects or []],
                          weights=os.path.basename(os.path.normpath(weights)), vae=args.vae,
                          mapper=args.mapper if args.code else None)
            info = PngInfo()
            info.add_text("parameters", json.dumps(params))
            cmd = ["python", "sample.py", "--prompt", prompt, "--seed", str(seed), "--steps", str(args.steps),
                   "--guidance", str(args.guidance), "--eta", str(args.eta), "--width", str(args.width),
                   "--height", str(args.height)]
            if args.negative_prompt:
                cmd += ["--negative-prompt", args.negative_prompt]
            for c, s in zip(args.code, subjects or []):
                cmd += ["--code", str(c), "--concept", s[2]]
            # what else decides the pixels: the weights (the toy model's too: another machine may have SDXL), the
            # mapper, the precision
            for flag, value in (("--weights", args.weights or (os.path.relpath(weights, ROOT) if toy else None)),
                                ("--vae", args.vae),
                                ("--mapper", os.path.relpath(args.mapper, ROOT) if toy and args.code else
                                 args.mapper if args.code and args.mapper != DEFAULT_MAPPER else None)):
                if value:
                    cmd += [flag, value]
            cmd += ["--dtype", str(dtype).replace("torch.", "")]
            info.add_text("command", shlex.join(cmd))
            Image.fromarray(img).save(paths[k], pnginfo=info)
            print(paths[k])
            images.append(img)
    if len(images) > 1 and not args.out.lower().endswith(".png"):
        sheet = os.path.join(args.out, "contact_sheet.png")
        subjects_named = "".join(f", code {c} ({s[2]})" for c, s in zip(args.code, subjects or []))
        title = f"rows are prompts, columns are seeds{subjects_named}"
        labelled_grid(images, prompts, [f"seed {s}" for s in seeds], title).save(
            sheet, pnginfo=grid_info("prompt", prompts, "seed", seeds, code=args.code,
                                     concept=[s[2] for s in subjects or []], steps=args.steps,
                                     guidance=args.guidance, width=args.width, height=args.height))
        print(sheet)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
