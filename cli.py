"""What the commands (sample.py, train.py, eval.py, prepare_data.py) share: device and dtype
choice, torchrun's processes, --help's format, the mapper file a flag names, and labelled image
grids.

Not a chapter: nothing here is SDXL or CoCoIns. It keeps the commands from importing each other.
"""

import argparse
import json
import os
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from model.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = ("auto = bfloat16 on CUDA GPUs that compute in it (Ampere and later), float16 on older ones, "
              "float32 elsewhere; under float16 the VAE stays float32")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in --help, except the empty ones (None, False, "", []) that say nothing."""

    def _get_help_string(self, action):
        # `is`, not `in (None, False)`: 0 == False, and a default of 0 says something
        empty = action.default is None or action.default is False or action.default in ("", [])
        return action.help if empty else super()._get_help_string(action)


def pick_device(name: str) -> torch.device:
    """--device: auto (CUDA, else Apple's MPS, else the CPU), or a device this machine has."""
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
    """--dtype: one of DTYPES; auto as DTYPE_HELP says."""
    if name == "auto":
        if device.type != "cuda":
            return torch.float32
        # bfloat16 where the GPU computes in it (Ampere and later); float16 on older cards
        # (V100, T4), where bfloat16 would be emulated. The VAE stays float32 under float16.
        with torch.cuda.device(device):
            try:
                native = torch.cuda.is_bf16_supported(including_emulation=False)
            except TypeError:  # PyTorch before 2.4
                native = torch.cuda.get_device_capability(device)[0] >= 8
        return torch.bfloat16 if native else torch.float16
    return getattr(torch, name)


@contextmanager
def torchrun_processes(device: torch.device):
    """(device, rank, world size) for the block. Alone: (device, 0, 1). Under torchrun (WORLD_SIZE
    > 1) each process joins the group, NCCL on GPUs with each process on its LOCAL_RANK GPU, gloo
    on CPUs, and leaves it when the block ends (on CPUs, all together: see below)."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    try:
        yield device, rank, world
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    if dist.is_initialized():
        if device.type != "cuda":
            # A gloo process that exits while rank 0 is still at work (eval.py's scoring) aborted about one run in
            # ten under torch 2.13 ("terminate called without an active exception", after the group was left), so
            # the processes leave together. The wait lasts as long as rank 0's work: no timeout worth the name.
            dist.monitored_barrier(timeout=timedelta(days=7))
        dist.destroy_process_group()


def mapper_file(path: str, flag: str = "--mapper", instead: str = "") -> str:
    """--mapper (--init-mapper): the mapper file itself, or a train.py run folder holding mapper.safetensors."""
    file = os.path.join(path, "mapper.safetensors") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UserError(f"{flag} {path}: no mapper there; train one with `python train.py --data celeba/` (it writes "
                        f"runs/cocoins/mapper.safetensors) and pass that file or its run folder{instead}")
    return file


def check_mapper_fits(f, model, flag: str = "--mapper") -> None:
    """A mapper makes pseudo-words as wide as the tokens of the encoders it was trained with."""
    widths = (model.clip_l.config.width, model.clip_g.config.width)
    if tuple(f.config.token_widths) != widths:
        raise UserError(f"{flag} was trained for text encoders {tuple(f.config.token_widths)} wide, but these "
                        f"weights' encoders are {widths} wide; use a mapper trained on the same SDXL")


def check_size(width: int, height: int) -> None:
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise UserError(f"--width {width} --height {height}: both must be positive multiples of 8 (the VAE downsamples by 8), e.g. 1024")


def labelled_grid(images: list[np.ndarray], row_labels: list[str], col_labels: list[str], title: str) -> Image.Image:
    """Images (H, W, 3) uint8, row by row, in a grid with a title line, a label above each column
    and one left of each row (labels cut to fit; the PNG text of `grid_info` holds them whole)."""
    rows, cols = len(row_labels), len(col_labels)
    h, w = images[0].shape[:2]
    try:
        font = ImageFont.load_default(size=max(10, w // 40))  # readable beside 1024 px images too
    except TypeError:  # Pillow 10.0 has one small bitmap font
        font = ImageFont.load_default()
    line = int(font.getbbox("Ag")[3]) + 4  # one line of text with a little air
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # the row labels' margin: as wide as the widest label, at most one image wide
    left = min(w, max(int(measure.textlength(label, font=font)) for label in row_labels) + 6)
    top = 2 * line  # the title, then the column labels
    sheet = Image.new("RGB", (left + cols * w, top + rows * h), "white")
    draw = ImageDraw.Draw(sheet)

    def fit(text: str, width: int) -> str:
        while len(text) > 1 and draw.textlength(text, font=font) > width - 4:
            text = text[:-2] + "…"
        return text

    draw.text((2, 2), fit(title, sheet.width), fill="black", font=font)
    for c, label in enumerate(col_labels):
        draw.text((left + c * w + 2, line + 2), fit(label, w), fill="black", font=font)
    for r, label in enumerate(row_labels):
        draw.text((2, top + r * h + 2), fit(label, left), fill="black", font=font)
    for k, image in enumerate(images):
        sheet.paste(Image.fromarray(image), (left + (k % cols) * w, top + (k // cols) * h))
    return sheet


def grid_info(rows: str, row_labels: list[str], columns: str, col_labels: list[str], **parameters) -> PngInfo:
    """The PNG text of a labelled grid: what its axes are, every label whole, and the parameters."""
    info = PngInfo()
    info.add_text("rows", json.dumps({rows: row_labels}))
    info.add_text("columns", json.dumps({columns: col_labels}))
    info.add_text("parameters", json.dumps(parameters))
    return info


def default_workers() -> int:
    """DataLoader workers: one core stays with the training process, at most 4 (enough to decode
    images ahead of a GPU step), none on a one-core machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(4, cores - 1)
