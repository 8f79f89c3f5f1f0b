"""Generate images with SDXL, optionally with a CoCoIns subject code.

    python sample.py --code 42 --prompt "a woman reading"
    python sample.py --code 42 --prompt "a woman reading" --prompt "a woman surfing" --num-images 4
    python sample.py --prompt "a lighthouse at dawn"                    # plain SDXL, no code

The same --code gives the same person in any prompt and on any seed. Every image is saved as a
PNG carrying its full generation parameters as PNG text; several images also get a contact
sheet (rows = prompts, columns = seeds), the paper's way of showing one subject everywhere.

Read this file last: it only parses flags and calls model/sdxl.py and model/mapper.py.
"""

import argparse
import json
import os
import shlex
import sys

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from model import attention
from model.checkpoint import UserError
from model.unet import COMPILE_MODES

# The concept words CoCoIns is trained on (data.py captions use them); with --code and no
# --concept, the first of these found in the prompt is the concept.
DEFAULT_CONCEPTS = ("woman", "man", "girl", "boy", "person")
DEFAULT_MAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "mapper.safetensors")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--prompt", action="append", required=True, help="text prompt (repeat for several)")
    p.add_argument("--negative-prompt", default="", help="negative prompt; empty = SDXL base's zero conditioning")
    p.add_argument("--code", type=int, action="append", default=[], help="CoCoIns subject code (repeat for several subjects)")
    p.add_argument("--concept", action="append", default=[], help="concept word each --code instantiates, in order (default: the first of %s in the prompt)" % ", ".join(DEFAULT_CONCEPTS))
    p.add_argument("--seed", type=int, action="append", default=None, help="noise seed (repeat for several; default 0)")
    p.add_argument("--num-images", type=int, default=None, help="images per prompt, seeds counting up from the first --seed")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic DDIM, 1 = DDPM-like)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--weights", default=None, help="SDXL single .safetensors file or diffusers folder (default: weights/sd_xl_base_1.0.safetensors, else the Hugging Face cache)")
    p.add_argument("--vae", default=None, help="replacement VAE (file or diffusers folder), e.g. the fp16-fix VAE")
    p.add_argument("--mapper", default=DEFAULT_MAPPER, help="trained CoCoIns mapper (train.py writes RUN/mapper.safetensors)")
    p.add_argument("--out", default="out", help="a .png file (one image) or a folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto = bfloat16 on CUDA, float32 elsewhere")
    p.add_argument("--attention", default="auto", choices=list(attention.BACKENDS), help="attention kernel")
    p.add_argument("--compile", nargs="?", const="regional", default=None, choices=COMPILE_MODES,
                   help="torch.compile: alone or `regional`, the UNet's repeated blocks (seconds to compile); "
                        "`full`, the whole UNet and the VAE decoder (minutes to compile, fastest after)")
    p.add_argument("--offload", action="store_true",
                   help="keep the models in CPU memory and move each to the GPU only while it runs (small GPUs)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay a recorded CUDA graph of the UNet step instead of launching its kernels one by one "
                        "(CUDA only, not with --offload; alone or with --compile)")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} asked for Apple's MPS but this PyTorch or machine has none; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def seeds_from(args) -> list[int]:
    seeds = args.seed or [0]
    if args.num_images is not None:
        if args.num_images < 1:
            raise UserError(f"--num-images {args.num_images}: ask for at least one image")
        if len(seeds) > 1:
            raise UserError("give either several --seed values or --num-images, not both")
        seeds = [seeds[0] + k for k in range(args.num_images)]
    return seeds


def output_paths(out: str, n: int, names: list[str]) -> list[str]:
    if out.lower().endswith(".png"):
        if n > 1:
            raise UserError(f"--out {out} names one file but {n} images were asked for; pass a folder instead")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        return [out]
    os.makedirs(out, exist_ok=True)
    return [os.path.join(out, name) for name in names]


def contact_sheet(images, rows: int, cols: int) -> Image.Image:
    h, w = images[0].shape[:2]
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for k, img in enumerate(images):
        sheet.paste(Image.fromarray(img), ((k % cols) * w, (k // cols) * h))
    return sheet


def subject_concepts(args, prompts) -> list[str]:
    """Check --code/--concept/--mapper before any weights load; return one concept per code."""
    if not args.code:
        if args.concept:
            raise UserError("--concept needs a --code to instantiate it")
        return []
    if not os.path.isfile(args.mapper):
        raise UserError(
            f"no trained mapper at {args.mapper}; train one with `python train.py --data celeba/` "
            "(it writes runs/cocoins/mapper.safetensors) and pass it with --mapper, or copy it to weights/mapper.safetensors"
        )
    if args.concept:
        if len(args.concept) != len(args.code):
            raise UserError(f"{len(args.code)} --code but {len(args.concept)} --concept given; give one concept per code, or none")
        return list(args.concept)
    words = prompts[0].lower().replace(",", " ").replace(".", " ").split()
    found = [c for c in DEFAULT_CONCEPTS if c in words]
    if len(found) < len(args.code):
        raise UserError(
            f"found {len(found)} concept word(s) ({', '.join(DEFAULT_CONCEPTS)}) in the prompt {prompts[0]!r} "
            f"for {len(args.code)} --code; name one per code with --concept WORD"
        )
    return found[: len(args.code)]


def subjects_from_codes(codes, concepts, mapper_path, device, dtype):
    """CoCoIns: each code -> z -> the mapper's pseudo-words, paired with its concept word."""
    from model import mapper

    f = mapper.load_mapper(mapper_path, device=device)
    subjects = []
    for code, concept in zip(codes, concepts):
        z = mapper.code_to_z(code, f.config.z_dim).to(device)
        w_l, w_g = f(z[None])
        subjects.append((w_l[0].to(dtype), w_g[0].to(dtype), concept))
    return subjects


def main(argv=None):
    args = parse_args(argv)
    from model.sdxl import MISSING_WEIGHTS, SDXL, check_cuda_graphs, check_size, find_default_weights

    prompts = args.prompt
    if not prompts or any(not p.strip() for p in prompts):
        raise UserError("every --prompt must be non-empty text")
    check_size(args.width, args.height)
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: use at least 1 step")
    seeds = seeds_from(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    attention.set_backend(args.attention)
    weights = args.weights or find_default_weights()
    if weights is None:
        raise UserError(MISSING_WEIGHTS)
    # Check what can be checked before spending a minute loading 7 GB.
    if args.cuda_graphs:
        check_cuda_graphs(device, args.offload)
    concepts = subject_concepts(args, prompts)

    names = [f"{i:03d}-seed{s}" + "".join(f"-code{c}" for c in args.code) + ".png"
             for i, (p, s) in enumerate((p, s) for p in prompts for s in seeds)]
    paths = output_paths(args.out, len(names), names)

    print(f"loading SDXL from {weights} on {device} ({str(dtype).replace('torch.', '')})", file=sys.stderr)
    model = SDXL.load(weights, device="cpu" if args.offload else device, dtype=dtype, vae_path=args.vae)
    if args.offload:
        model.enable_offload(device)
    if args.compile:
        model.compile(args.compile)
    if args.cuda_graphs:
        model.enable_cuda_graphs()
    subjects = subjects_from_codes(args.code, concepts, args.mapper, device, dtype) if args.code else None

    images = []
    k = 0
    for prompt in prompts:
        for seed in seeds:
            img = model.generate(prompt, seed, args.negative_prompt, args.steps, args.guidance, args.eta,
                                 args.width, args.height, subjects, progress=True)
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
            info.add_text("command", shlex.join(cmd))
            Image.fromarray(img).save(paths[k], pnginfo=info)
            print(paths[k])
            images.append(img)
            k += 1
    if len(images) > 1 and not args.out.lower().endswith(".png"):
        sheet = os.path.join(args.out, "contact_sheet.png")
        contact_sheet(images, len(prompts), len(seeds)).save(sheet)
        print(sheet)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
