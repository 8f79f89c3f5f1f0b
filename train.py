"""Train the CoCoIns mapping network f on CelebA (paper section 3.3, eq. 5-9).

    python train.py --data celeba/
    python train.py --data celeba/ --resume                     # continue a stopped run
    torchrun --nproc_per_node=8 train.py --data celeba/        # data-parallel over 8 GPUs

This file is the loop: every step is step.py's `cocoins_step` (the method, eq. 5-9) on a batch
from data.py, followed by AdamW on f alone. It reads top to bottom: the command line, the run,
then what the run leans on (models and processes, the loader over epochs and torchrun ranks,
checkpoints and the log, sample grids, stopping).

A run folder (--out) holds:
    mapper.safetensors          the trained f, for `sample.py --mapper` (config + arguments as metadata)
    state.pt                    everything --resume needs: f, AdamW, step, data position
    log.jsonl                   one line of loss terms per step
    samples/step_XXXXXX.png     fixed codes (rows) in fixed prompts (columns), to watch consistency emerge
    README.md                   the mapper's model card (Hugging Face Hub convention), with the newest grid
Both checkpoint files are replaced atomically, every --checkpoint-every steps, at the end, and
when Ctrl-C or SIGTERM stops the run. VAE latents are computed once and cached (--cache-dir),
keyed by the VAE's weights. Nothing in a step draws from a global random generator (draw_noise
and data.py seed their own from --seed and the step or epoch), so a resume is exact without one.

Read next: sample.py (using the trained mapper).
"""

import argparse
import json
import math
import os
import shlex
import signal
import sys
from contextlib import contextmanager
from dataclasses import asdict
from itertools import islice

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from cli import (DTYPE_HELP, DTYPES, HelpFormatter, check_mapper_fits, default_workers, grid_info, labelled_grid,
                 mapper_file, pick_device, pick_dtype, torchrun_processes)
from data import DataConfig, ImageFolder, LatentCache, collate, vae_fingerprint
from losses import DISTANCES, GAMMA_UNITS, MASK_REDUCTIONS, MASKS, NEGATIVES, LossConfig, LossTerms
from model import attention, clip, ddim, export, speed
from model.checkpoint import MISSING_WEIGHTS, UserError, find_default_weights, load_mapper, save_mapper
from model.mapper import NORMS, Mapper, MapperConfig, code_to_z, embedding_stats, find_concept
from model.sdxl import SDXL
from model.vae import SCALING_FACTOR
from step import GAMMA_WARMUP, T_MAX, T_MIN, TIME_IDS, TRIPLET_CHOICES, GammaScale, StepConfig, cocoins_step, draw_noise

# What --sample-every draws: each code is a row, each prompt a column with its own noise seed,
# the same every time, so the grids of successive steps compare cell by cell. A trained f gives
# one person per row (per concept word) across columns and different people across rows.
SAMPLE_CODES = (0, 1, 2, 3)
SAMPLE_PROMPTS = (
    ("a close-up photo of a woman looking at the camera", "woman"),
    ("a woman reading a book in a cafe", "woman"),
    ("a portrait photo of a man, studio lighting", "man"),
    ("a man hiking in the mountains", "man"),
)
SAMPLE_STEPS = 20  # DDIM steps per image: a recognisable face at two thirds of a 30-step image's cost
SAMPLE_GUIDANCE = 5.0  # sample.py's default


# The flags of the method's choices and ablations, with a new run's defaults (the dataclasses').
METHOD_DEFAULTS = {
    "negative": LossConfig.negative, "mask": LossConfig.mask, "mask_reduction": LossConfig.mask_reduction,
    "positive_prompt": StepConfig.positive_prompt, "positive_noise": StepConfig.positive_noise,
    "time_ids": StepConfig.time_ids, "mapper_norm": MapperConfig.norm, "mapper_gain": MapperConfig.gain,
    "gamma_unit": LossConfig.gamma_unit,
}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None):
    """The flags, each number checked once, here, with one sentence, before anything is loaded."""
    mapper_defaults, loss_defaults = MapperConfig(), LossConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", required=True, help="CelebA or CelebA-HQ folder, in any layout data.py reads")
    p.add_argument("--weights", default=None, help="SDXL single .safetensors file or diffusers folder (default: weights/sd_xl_base_1.0.safetensors, else the Hugging Face cache)")
    p.add_argument("--vae", default=None, help="replacement VAE (file or diffusers folder) for encoding the images")
    p.add_argument("--out", default=os.path.join("runs", "cocoins"), help="run folder: mapper.safetensors, state.pt, log.jsonl, samples/")
    p.add_argument("--cache-dir", default=None, help="where VAE latents are cached (default: latent_cache/ beside the run folder, shared by runs; never inside --data, which may be read-only)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint (without it, an existing run is never overwritten)")
    # Schedule (the paper gives none): 10k steps of batch 4 show 40k images, a fifth of CelebA's 202,599.
    p.add_argument("--steps", type=int, default=10_000, help="total training steps K (λ_neg reaches γ at step K)")
    # 4 triplets (12 UNet passes with gradients) fit an 80 GB GPU at 1024 px; less memory: --grad-checkpointing.
    p.add_argument("--batch-size", type=int, default=4, help="images per step and per process (each gives one triplet)")
    p.add_argument("--resolution", type=int, default=1024, help="training size in pixels (SDXL's native 1024; latents are 1/8)")
    p.add_argument("--split", default="all", choices=["all", "train", "valid", "test"], help="CelebA partition (list_eval_partition.txt); f needs no held-out faces")
    p.add_argument("--crop", default="center", choices=["center", "random"], help="square crop after resizing the shorter side (passed to SDXL's micro-conditioning); random crops differ every epoch, so each epoch encodes and caches new latents")
    # AdamW moves each weight by about lr per step: 1e-4 lets f's weights (He-initialised, ~0.04)
    # drift by their own size over the run when the gradient is consistent, and far less when it is noise.
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (PyTorch's default)")
    p.add_argument("--init-mapper", default=None, help="start f from a trained mapper (its mapper.safetensors, or a train.py run folder) instead of a fresh one: the paper's route to a new concept; its z-dim/depth/hidden/norm are the file's, its widths must match --weights' text encoders")
    p.add_argument("--z-dim", type=int, default=mapper_defaults.z_dim, help="c, the width of the latent code z")
    p.add_argument("--depth", type=int, default=mapper_defaults.depth, help="n, the number of linear layers of f")
    p.add_argument("--hidden", type=int, default=mapper_defaults.hidden, help="width of f's hidden layers")
    p.add_argument("--gamma", type=float, default=loss_defaults.gamma, help="γ, the final weight of the negative term (λ_neg = γ·(k/K)^β)")
    p.add_argument("--beta", type=float, default=loss_defaults.beta, help="β, the shape of the λ_neg ramp (1 = linear)")
    p.add_argument("--lambda-con", type=float, default=loss_defaults.lambda_con, help="λ_con, the weight of the contrastive loss")
    p.add_argument("--lambda-back", type=float, default=loss_defaults.lambda_back, help="λ_back, the weight of the background loss")
    p.add_argument("--lambda-spread", type=float, default=loss_defaults.lambda_spread, help="λ_spread, the weight of a term that spreads the codes' words over more directions (not in the paper; 0 = off; the toy world found no gain)")
    p.add_argument("--distance", default=loss_defaults.distance, choices=list(DISTANCES), help="distance d between x̂₀ estimates")
    # The method's open choices and the paper's ablations (Tables 3-5). Their default is None so
    # that --resume, which keeps a run's method, can tell "not given" from "given".
    method = p.add_argument_group("method choices and ablations (a resumed run keeps its own; the default is for new runs)")
    method.add_argument("--negative", choices=NEGATIVES, help=f"the negative term of L_con: `reciprocal`, +λ_neg/d_m(x̂*,x̂-) (eq. 7), or `subtract`, −λ_neg·d_m(x̂*,x̂-) (Table 3, \"Pos+Neg as a subtraction\") (default: {METHOD_DEFAULTS['negative']})")
    method.add_argument("--mask", choices=MASKS, help=f"the mask of L_con: `subject`, the subject mask m, or `none`, m = 1 everywhere (Table 4, \"without mask\"; then m̃ = 1 − m = 0 and L_back is zero) (default: {METHOD_DEFAULTS['mask']})")
    method.add_argument("--mask-reduction", choices=MASK_REDUCTIONS, help=f"a masked distance averages over `all` C·h·w elements (d(m·x, m·y) literally) or over the mask's `area` C·Σm, in L_con and L_back (default: {METHOD_DEFAULTS['mask_reduction']})")
    method.add_argument("--positive-prompt", choices=TRIPLET_CHOICES, help=f"the positive's caption: the `other` caption P2, or the anchor's `same` P1 (Table 5, \"same prompts\") (default: {METHOD_DEFAULTS['positive_prompt']})")
    method.add_argument("--positive-noise", choices=TRIPLET_CHOICES, help=f"the positive's noise: the `other` noise ε2, or the anchor's `same` ε1 (Table 5, \"same noise\") (default: {METHOD_DEFAULTS['positive_noise']})")
    method.add_argument("--time-ids", choices=TIME_IDS, help=f"SDXL's size/crop conditioning in training: the image's own from the `data` (original size, crop offset, R, R), or what `sampling` passes (R, R, 0, 0, R, R) (default: {METHOD_DEFAULTS['time_ids']})")
    method.add_argument("--mapper-norm", choices=NORMS, help=f"f's output layer: `layernorm`, w = μ + σ⊙LayerNorm(Wh+b), or `none`, w = μ + σ⊙(Wh+b) (default: {METHOD_DEFAULTS['mapper_norm']})")
    method.add_argument("--mapper-gain", type=float, help=f"g, the LayerNorm output's spread in units of a real token's: w = μ + g·σ⊙LayerNorm(Wh+b) (default: {METHOD_DEFAULTS['mapper_gain']})")
    method.add_argument("--gamma-unit", choices=GAMMA_UNITS, help=f"γ's unit: `absolute`, λ_neg = γ·(k/K)^β, or `d_neg`, γ in units of D², D the mean d_m(x̂*,x̂-) of the run's first {GAMMA_WARMUP} steps (no negative term during them), so that one γ asks the same push of any model (default: {METHOD_DEFAULTS['gamma_unit']})")
    # (step.py says why the training timesteps lie in [200, 800))
    p.add_argument("--t-min", type=int, default=T_MIN, help="smallest training timestep (inclusive)")
    p.add_argument("--t-max", type=int, default=T_MAX, help="largest training timestep (exclusive, at most 1000)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints (a killed run loses at most this many; Ctrl-C or SIGTERM saves the current step)")
    p.add_argument("--sample-every", type=int, default=500, help=f"steps between sample grids in OUT/samples/ ({len(SAMPLE_CODES)} codes x {len(SAMPLE_PROMPTS)} prompts, {SAMPLE_STEPS} DDIM steps; 0 = never), at every multiple of it")
    p.add_argument("--seed", type=int, default=0, help="seed of f's initialisation, the codes, noises and timesteps, crops and captions")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (under torchrun: each process's own GPU)")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help=f"dtype of the frozen SDXL ({DTYPE_HELP}); f and the losses stay float32")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute the UNet's blocks in backward instead of storing them: far less memory, slower steps")
    p.add_argument("--compile", nargs="?", const="regional", default=None, choices=speed.COMPILE_MODES,
                   help="torch.compile the UNet: alone or `regional`, its repeated blocks (seconds to compile); `full`, "
                        "the whole UNet (minutes to compile, fastest after); the grad and no-grad passes compile once each")
    p.add_argument("--attention", default="auto", choices=list(attention.BACKENDS), help="attention kernel")
    p.add_argument("--num-workers", type=int, default=default_workers(), help="DataLoader worker processes per training process (0 = load in the main process); by default min(4, cores − 1), this machine's count")
    args = p.parse_args(argv)
    # The numbers a user can get wrong, each with one sentence.
    positive = {"--steps": args.steps, "--batch-size": args.batch_size, "--resolution": args.resolution,
                "--checkpoint-every": args.checkpoint_every, "--z-dim": args.z_dim, "--depth": args.depth,
                "--hidden": args.hidden, "--lr": args.lr}
    for flag, value in positive.items():
        if not value > 0:
            raise UserError(f"{flag} {value} must be positive")
    if args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} must be a multiple of 8 (the VAE downsamples by 8), e.g. 1024")
    if not 0 <= args.t_min < args.t_max <= ddim.T:
        raise UserError(f"--t-min {args.t_min} --t-max {args.t_max}: need 0 <= t-min < t-max <= {ddim.T}")
    if args.sample_every < 0 or args.num_workers < 0 or args.seed < 0 or args.weight_decay < 0:
        raise UserError("--sample-every, --num-workers, --seed and --weight-decay must not be negative")
    weights = {"--gamma": args.gamma, "--beta": args.beta, "--lambda-con": args.lambda_con,
               "--lambda-back": args.lambda_back, "--lambda-spread": args.lambda_spread}
    for flag, value in weights.items():
        if not (math.isfinite(value) and value >= 0):  # negative: a term's sign flips, or λ_neg decreases
            raise UserError(f"{flag} {value} must be a finite number >= 0")
    if args.mapper_gain is not None and not (math.isfinite(args.mapper_gain) and args.mapper_gain > 0):
        raise UserError(f"--mapper-gain {args.mapper_gain} must be a finite number > 0 (1: a word as loud as a real token)")
    if args.mapper_norm == "none" and args.mapper_gain not in (None, 1.0):
        raise UserError(f"--mapper-gain {args.mapper_gain} scales the output LayerNorm, which --mapper-norm none removes; "
                        "drop one of the two")
    return args


def keep_method(args, saved_args: dict | None):
    """Fill in the method flags (METHOD_DEFAULTS) not given: a new run's defaults, or on --resume
    the run's own. A resume that names another value is refused: a run trained half with one
    method and half with another is neither, and no ablation."""
    for name, default in METHOD_DEFAULTS.items():
        kept = default if saved_args is None else saved_args.get(name, default)  # older runs: the default
        given = getattr(args, name)
        if saved_args is not None and given is not None and given != kept:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"--resume: the run in {args.out} was trained with {flag} {kept}; a resumed run keeps "
                            f"its method, so drop {flag} {given}, or start a new run with another --out")
        setattr(args, name, kept if given is None else given)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parse_args(argv)
    with torchrun_processes(pick_device(args.device)) as (device, rank, world), signals_stop_the_run():
        train(args, argv, device, rank, world)


def train(args, argv: list[str], device: torch.device, rank: int, world: int):
    # Cheap checks first: a wrong folder must not cost a minute of loading 7 GB.
    check_run_folder(args)
    if world > 1:
        dist.barrier()  # every rank has looked at the folder before rank 0 writes into it
    state = load_checkpoint(args.out) if args.resume else None
    keep_method(args, state and state["args"])
    weights = args.weights or find_default_weights()
    if weights is None:
        raise UserError(MISSING_WEIGHTS)
    # --init-mapper is read now (a few MB), so a wrong path fails before the big load; a resumed
    # run continues its own f instead.
    init = load_mapper(mapper_file(args.init_mapper, "--init-mapper")) if args.init_mapper and state is None else None
    dtype = pick_dtype(args.dtype, device)
    attention.set_backend(args.attention)
    dataset = ImageFolder(DataConfig(root=args.data, resolution=args.resolution, split=args.split, crop=args.crop,
                                seed=args.seed), caption_ok=concept_survives_truncation(clip.Tokenizer.bundled("eos")))
    say(rank, dataset.summary)
    steps_per_epoch = len(dataset) // world // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(dataset)} usable images cannot fill one batch of {args.batch_size} on each of {world} "
                        f"processes; lower --batch-size")

    base_model, concepts = export.base_model_identity(weights), dataset.concepts()  # what the mapper records
    say(rank, f"loading SDXL from {weights} on {device} ({str(dtype).replace('torch.', '')})")
    model = load_frozen_sdxl(args, weights, device, dtype)
    say(rank, f"VAE latents cached in {attach_latent_cache(dataset, model, args, dtype).dir}")
    f = new_mapper(model, args) if init is None else start_from(init, model)
    # AdamW on f alone: nothing else is handed to the optimizer, so nothing else can change.
    optimizer = torch.optim.AdamW(f.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loss_config = LossConfig(distance=args.distance, gamma=args.gamma, beta=args.beta, lambda_con=args.lambda_con,
                             lambda_back=args.lambda_back, negative=args.negative, mask=args.mask,
                             mask_reduction=args.mask_reduction, lambda_spread=args.lambda_spread,
                             gamma_unit=args.gamma_unit)
    step_config = StepConfig(positive_prompt=args.positive_prompt, positive_noise=args.positive_noise,
                             time_ids=args.time_ids)
    step, epoch, position, last_checkpoint = 0, 0, 0, None
    gamma = GammaScale(args.gamma_unit, state and state.get("gamma_d_neg"))  # γ's unit (1 unless --gamma-unit d_neg)
    if state is not None:
        step, epoch, position, changed = resume(args, state, f, optimizer)
        last_checkpoint = step
        say(rank, f"resuming {args.out} at step {step}{changed}")
    del state
    ddp_f = wrap_ddp(f, device, world)
    latent_shape = (4, args.resolution // 8, args.resolution // 8)
    log = Log(run_files(args.out)["log.jsonl"], step, args.steps, rank)

    try:
        # the batches of the steps left (none when a resumed run is already done)
        steps_left = max(args.steps - step, 0)
        for epoch, position, batch in islice(batches(dataset, epoch, position, steps_per_epoch, args, rank, world,
                                                     device), steps_left):
            # The CoCoIns step (eq. 5-9) on this batch, its codes, noises and timesteps.
            x0 = dataset.cache.fill(batch)
            noise = draw_noise(args.seed, rank, step, args.batch_size, latent_shape, args.z_dim, args.t_min, args.t_max)
            try:
                terms = cocoins_step(model, ddp_f, x0, batch, noise, step + 1, args.steps, loss_config, step_config,
                                     gamma.value())
                optimizer.zero_grad(set_to_none=True)
                terms.total.backward()
            except torch.cuda.OutOfMemoryError:
                raise UserError(f"out of GPU memory at --batch-size {args.batch_size} and --resolution "
                                f"{args.resolution}; add --grad-checkpointing or lower --batch-size") from None
            numbers = step_numbers(terms, f, world)
            if not (math.isfinite(numbers["loss"]) and math.isfinite(numbers["grad_norm"])):
                raise UserError(diverged(args, step + 1, numbers["loss"], numbers["grad_norm"], last_checkpoint))
            # The update, its log line and its checkpoint happen whole: a Ctrl-C waits for them.
            with signals_deferred():
                optimizer.step()
                step, position = step + 1, position + 1
                log.write(step, numbers, terms.lambda_neg, gamma.value())
                gamma.observe(numbers["d_neg"])  # (the logged, all-ranks mean: every rank gets the same unit)
                if step % args.checkpoint_every == 0 or step == args.steps:
                    if rank == 0:
                        save_checkpoint(args.out, f, optimizer, step, epoch, position, args, base_model, concepts, gamma)
                    last_checkpoint = step  # every rank knows it, for the NaN message
            if rank == 0 and args.sample_every and step % args.sample_every == 0:
                save_samples(model, f, args, step)
    except KeyboardInterrupt:
        log.close()  # the progress bar ends before the line that says where the run stopped
        # Ctrl-C or SIGTERM: the steps done so far are kept, whether or not a checkpoint was due.
        if rank == 0 and step > 0 and step != last_checkpoint:
            save_checkpoint(args.out, f, optimizer, step, epoch, position, args, base_model, concepts, gamma)
        say(rank, stopped(argv, step))
        raise
    finally:
        log.close()
    if rank == 0 and os.path.isfile(run_files(args.out)["mapper.safetensors"]):
        export.write_model_card(args.out)  # again, with the grid of the last step
    say(rank, done(args))


# ----------------------------------------------------------------------------------------------
# Processes and models
# ----------------------------------------------------------------------------------------------


def say(rank: int, message: str):
    if rank == 0:
        tqdm.write(message, file=sys.stderr)


def wrap_ddp(f: Mapper, device: torch.device, world: int):
    """DDP wraps f alone: it averages f's gradients over the ranks; every rank holds the frozen SDXL."""
    if world == 1:
        return f
    return torch.nn.parallel.DistributedDataParallel(f, device_ids=[device] if device.type == "cuda" else None)


def load_frozen_sdxl(args, weights: str, device, dtype) -> SDXL:
    model = SDXL.load(weights, device=device, dtype=dtype, vae_path=args.vae)
    for module in (model.unet, model.vae, model.clip_l, model.clip_g):
        module.requires_grad_(False)  # frozen: gradients pass through SDXL, never into it
    model.unet.gradient_checkpointing = args.grad_checkpointing
    speed.save_memory(model.unet, model.vae)
    if args.compile:
        # Static shapes (model/speed.py compile_unet): the 3B pass with gradients, the 2B pass
        # without and the sampling batch each compile once, with the fastest kernels for their shape.
        speed.compile(model, args.compile)
    return model


def attach_latent_cache(dataset: ImageFolder, model: SDXL, args, dtype) -> LatentCache:
    # A latent is the VAE's mean (not a sample: the cached latent *is* the latent), scaled for the UNet.
    def encode(images):
        return model.vae.encode(images.to(model.device)).mode() * SCALING_FACTOR

    cache_dir = args.cache_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "latent_cache")
    dataset.cache = LatentCache(cache_dir, encode, [f"vae={vae_fingerprint(model.vae)}", f"dtype={dtype}",
                                                    f"resolution={args.resolution}", "latent=mode*scaling_factor"])
    return dataset.cache


def token_stats(model: SDXL) -> list[tuple[Tensor, Tensor]]:
    """(mean, std) of each encoder's token table, in the mapper's order (CLIP-L, then bigG)."""
    tables = (model.clip_l.text_model.embeddings.token_embedding.weight, model.clip_g.token_embedding.weight)
    return [embedding_stats(t) for t in tables]


def new_mapper(model: SDXL, args) -> Mapper:
    """f, initialised from --seed, its pseudo-words shaped like each encoder's real tokens."""
    torch.manual_seed(args.seed)
    config = MapperConfig(z_dim=args.z_dim, depth=args.depth, hidden=args.hidden, norm=args.mapper_norm,
                          gain=args.mapper_gain, token_widths=(model.clip_l.config.width, model.clip_g.config.width))
    return Mapper(config, token_stats(model)).to(model.device).train()


def start_from(init: Mapper, model: SDXL) -> Mapper:
    """A trained f to continue from, if it was made for text encoders of these widths."""
    check_mapper_fits(init, model, "--init-mapper")
    return init.to(model.device).train().requires_grad_(True)


def step_numbers(terms: LossTerms, f: Mapper, world: int) -> dict[str, float]:
    """The step's logged numbers, averaged over the ranks (the step's one sync), ‖∇f‖ among them."""
    # ‖∇f‖, for the log and as a finiteness check of every gradient (nothing is clipped).
    grad_norm = torch.nn.utils.clip_grad_norm_(f.parameters(), float("inf"))
    values = torch.stack([terms.total, terms.l_con, terms.l_pos, terms.l_neg, terms.d_neg, terms.l_back,
                          terms.l_spread, grad_norm]).detach().float()
    if world > 1:
        dist.all_reduce(values)  # every rank logs, and stops on, the same numbers
        values /= world
    return dict(zip(("loss", "l_con", "l_pos", "l_neg", "d_neg", "l_back", "l_spread", "grad_norm"), values.tolist()))


# ----------------------------------------------------------------------------------------------
# Data: the epochs' batches, latents from the cache
# ----------------------------------------------------------------------------------------------


def concept_survives_truncation(tok):
    """A test for data.py's captions: does the concept word still stand whole in the 77-token
    prompt after its pseudo-word is inserted? (A long captions.jsonl caption could push it past
    the truncation point, which would otherwise end the run mid-way.)"""
    def ok(caption: str, concept: str) -> bool:
        concept_ids = tok.encode(concept)
        try:
            i = find_concept(tok([caption])[0].tolist(), concept_ids, word=concept, prompt=caption)
        except UserError:
            return False
        # After insertion the concept occupies [i + 1, i + 1 + n), which must end before the EOS
        # at position 76 at the latest.
        return i + 1 + len(concept_ids) <= clip.CONTEXT_LENGTH - 1
    return ok


def batches(dataset: ImageFolder, epoch: int, position: int, steps_per_epoch: int, args, rank: int, world: int,
            device: torch.device):
    """(epoch, position, batch) from batch `position` of `epoch` on, epoch after epoch, without end."""
    while True:
        if position >= steps_per_epoch:
            epoch, position = epoch + 1, 0
        for batch in worker_errors(make_loader(dataset, epoch, position, args, rank, world, device.type == "cuda")):
            yield epoch, position, batch
            position += 1


def make_loader(dataset: ImageFolder, epoch: int, position: int, args, rank: int, world: int, pin_memory: bool):
    """The batches of `epoch` from batch `position` on, this rank's shard (DistributedSampler)."""
    sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                  seed=args.seed, drop_last=True)
    sampler.set_epoch(epoch)
    # Captions and crops depend on the epoch too; workers copy the dataset when the iterator starts.
    dataset.set_epoch(epoch)
    # Every batch has B images (drop_last), so shapes never change and resuming is a list slice.
    indices = list(sampler)[position * args.batch_size:]
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, sampler=indices, drop_last=True,
                                       collate_fn=collate, num_workers=args.num_workers,
                                       pin_memory=pin_memory)


def worker_errors(loader):
    """The loader's batches. A UserError raised in a DataLoader worker (the dataset's "images in a
    row could not be read") reaches the main process with the worker's traceback in its message:
    it is raised again as its own sentence."""
    try:
        yield from loader
    except UserError as e:
        text = str(e).strip()
        if "Original Traceback" not in text:
            raise
        raise UserError(text.splitlines()[-1].split("UserError: ", 1)[-1]) from None


# ----------------------------------------------------------------------------------------------
# Checkpoints, resume and the log
# ----------------------------------------------------------------------------------------------


def run_files(out: str) -> dict[str, str]:
    return {name: os.path.join(out, name) for name in ("mapper.safetensors", "state.pt", "log.jsonl")}


def check_run_folder(args):
    """Never overwrite a trained mapper by accident; --resume needs a checkpoint to resume.

    A folder with only a log (a run stopped before its first checkpoint) holds nothing to lose:
    a new run starts over in it."""
    files = run_files(args.out)
    if args.resume and not os.path.isfile(files["state.pt"]):
        raise UserError(f"--resume: {args.out} holds no run to continue (no state.pt); drop --resume to start a new run there")
    if not args.resume and (os.path.exists(files["state.pt"]) or os.path.exists(files["mapper.safetensors"])):
        raise UserError(f"{args.out} already holds a training run; pass --resume to continue it, or choose another --out")


def load_checkpoint(out: str) -> dict:
    return torch.load(run_files(out)["state.pt"], map_location="cpu", weights_only=True)


def resume(args, state: dict, f: Mapper, optimizer) -> tuple[int, int, int, str]:
    """Load OUT/state.pt's `state` into f and the optimizer; -> (step, epoch, position, changed settings)."""
    fields = state["mapper_config"]
    saved = MapperConfig(**{**fields, "token_widths": tuple(fields["token_widths"])})
    if saved != f.config:
        raise UserError(f"--resume: the run in {args.out} trains a mapper with --z-dim {saved.z_dim} --depth "
                        f"{saved.depth} --hidden {saved.hidden} --mapper-norm {saved.norm} --mapper-gain {saved.gain} on encoders of widths "
                        f"{saved.token_widths}; pass the same, or start a new run with another --out")
    f.load_state_dict(state["mapper"])
    optimizer.load_state_dict(state["optimizer"])
    # The command line wins (e.g. a lower --lr after a NaN, more --steps); say what changed.
    # load_state_dict brought back the saved learning rate and weight decay with the moments.
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = args.lr, args.weight_decay
    changed = "".join(f"; {k} {v} -> {getattr(args, k)}" for k, v in state["args"].items()
                      if k != "resume" and getattr(args, k, v) != v)
    return state["step"], state["epoch"], state["position"], changed


def save_checkpoint(out: str, f: Mapper, optimizer, step: int, epoch: int, position: int, args, base_model: dict,
                    concepts: dict[str, int], gamma: GammaScale):
    """state.pt (all that --resume needs), mapper.safetensors (with what it is: model/export.py) and the
    model card README.md, each replaced atomically, with the file mode the user's umask gives the rest
    of the run folder.

    --resume reads only state.pt, which holds f too: a kill between the two renames leaves a
    mapper.safetensors one checkpoint older at worst, never a resume that mixes two steps."""
    state = {
        "step": step,
        "epoch": epoch,  # the data position: the next batch is batch `position` of `epoch`
        "position": position,
        "mapper": f.state_dict(),
        "mapper_config": asdict(f.config),
        "optimizer": optimizer.state_dict(),
        "args": vars(args),
        "gamma_d_neg": gamma.seen,  # the first steps' d_neg that set γ's unit under --gamma-unit d_neg
    }
    path = run_files(out)["state.pt"]
    tmp = os.path.join(out, f".state-{os.getpid()}.pt.tmp")  # the process's own name: torch.save creates it
    try:
        torch.save(state, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())  # on disk before the rename makes it the checkpoint
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    mapper_path = run_files(out)["mapper.safetensors"]
    save_mapper(mapper_path, f, metadata=export.training_metadata(step, vars(args), base_model, concepts))
    export.write_model_card(out)


class Log:
    """log.jsonl (one line of loss terms per step, rank 0 writes) and the progress bar."""

    def __init__(self, path: str, step: int, steps: int, rank: int):
        self.file = None
        if rank == 0:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            trim_log(path, step)
            self.file = open(path, "a", encoding="utf-8")
        self.progress = tqdm(total=steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="train")

    def write(self, step: int, numbers: dict[str, float], lambda_neg: float, gamma_scale: float = 1.0):
        if self.file is None:
            return
        n = numbers
        self.file.write(json.dumps(dict(step=step, loss=n["loss"], l_con=n["l_con"], l_pos=n["l_pos"], l_neg=n["l_neg"],
                                        d_neg=n["d_neg"], l_back=n["l_back"], l_spread=n["l_spread"],
                                        lambda_neg=lambda_neg, gamma_scale=gamma_scale, grad_norm=n["grad_norm"])) + "\n")
        self.file.flush()
        self.progress.set_postfix_str(f"loss {n['loss']:.4g} con {n['l_con']:.4g} pos {n['l_pos']:.4g} "
                                      f"1/neg {n['l_neg']:.4g} d_neg {n['d_neg']:.4g} back {n['l_back']:.4g} "
                                      f"λ_neg {lambda_neg:.3g}")
        self.progress.update()

    def close(self):  # closing twice is harmless
        self.progress.close()
        if self.file is not None:
            self.file.close()


def trim_log(path: str, step: int):
    """Drop log lines past `step`: those of a stopped run's steps after its last checkpoint."""
    if not os.path.isfile(path):
        return
    def keep(line):
        try:
            return json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):  # a line cut short (disk full, power loss)
            return False

    with open(path, encoding="utf-8") as fh:
        kept = [line if line.endswith("\n") else line + "\n" for line in fh if line.strip() and keep(line)]
    with open(path, "w", encoding="utf-8") as fh:
        fh.writelines(kept)


# ----------------------------------------------------------------------------------------------
# Sample grids
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def save_samples(model: SDXL, f: Mapper, args, step: int):
    """OUT/samples/step_XXXXXX.png: a row per code in SAMPLE_CODES, a column per prompt in
    SAMPLE_PROMPTS (column k drawn with noise seed k), labelled, its parameters as PNG text."""
    path = os.path.join(args.out, "samples", f"step_{step:06d}.png")
    say(0, f"drawing the sample grid of step {step} ({len(SAMPLE_CODES)} codes x {len(SAMPLE_PROMPTS)} prompts, "
           f"{SAMPLE_STEPS} DDIM steps each) into {path}")
    w_l, w_g = f(torch.stack([code_to_z(code, f.config.z_dim) for code in SAMPLE_CODES]).to(model.device))
    # Row by row (a code each), column by column; column = seed: a code must keep its person across
    # noises, as sample.py users expect. One UNet batch per row.
    cols = len(SAMPLE_PROMPTS)
    words = [(w_l.repeat_interleave(cols, dim=0), w_g.repeat_interleave(cols, dim=0),
              [concept for _ in SAMPLE_CODES for _, concept in SAMPLE_PROMPTS])]
    images = model.generate([prompt for _ in SAMPLE_CODES for prompt, _ in SAMPLE_PROMPTS],
                            [col for _ in SAMPLE_CODES for col in range(cols)], words, steps=SAMPLE_STEPS,
                            guidance=SAMPLE_GUIDANCE, width=args.resolution, height=args.resolution, batch_size=cols)
    codes = [f"code {code}" for code in SAMPLE_CODES]
    prompts = [f"{prompt} (seed {col})" for col, (prompt, _) in enumerate(SAMPLE_PROMPTS)]
    grid = labelled_grid(images, codes, prompts, f"step {step}: rows are codes, columns are prompts (seed = column)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    grid.save(path, pnginfo=grid_info("code", list(SAMPLE_CODES), "prompt", [p for p, _ in SAMPLE_PROMPTS],
                                      step=step, seeds=list(range(len(SAMPLE_PROMPTS))), steps=SAMPLE_STEPS,
                                      guidance=SAMPLE_GUIDANCE, size=args.resolution,
                                      concepts=[c for _, c in SAMPLE_PROMPTS]))


# ----------------------------------------------------------------------------------------------
# Stopping: Ctrl-C and SIGTERM, a NaN, the end
# ----------------------------------------------------------------------------------------------


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextmanager
def signals_stop_the_run():
    """SIGTERM (a scheduler's, or torchrun's on Ctrl-C) stops the run as Ctrl-C does: with a
    checkpoint of the current step."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def signals_deferred():
    """A block that Ctrl-C and SIGTERM do not cut in half: a signal during it stops the run once it ends."""
    received = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt


def stopped(argv: list[str], step: int) -> str:
    """The one line after Ctrl-C or SIGTERM."""
    if step == 0:
        return "stopped before the first step; nothing to save (the same command starts again)"
    again = shlex.join(["python", "train.py", *argv] + ([] if "--resume" in argv else ["--resume"]))
    return f"stopped at step {step}, saved; continue with `{again}`"


def diverged(args, step: int, loss: float, grad_norm: float, last_checkpoint: int | None) -> str:
    """The one sentence for a NaN or infinite loss or gradient."""
    what = f"the loss became {loss}" if not math.isfinite(loss) else f"the gradient norm became {grad_norm}"
    if last_checkpoint is None:
        return (f"{what} at step {step}, before any checkpoint; start again with a lower --lr "
                f"(the same settings repeat every step exactly)")
    return (f"{what} at step {step}, so training stopped without taking it ({args.out}/mapper.safetensors and "
            f"state.pt still hold step {last_checkpoint}); continue with --resume and a lower --lr (the same "
            f"settings repeat every step exactly)")


def done(args) -> str:
    """The closing line: where the mapper is, and a sample.py command that uses it with these weights."""
    mapper_path = run_files(args.out)["mapper.safetensors"]
    command = ["python", "sample.py", "--mapper", mapper_path, "--code", "42", "--prompt", "a woman reading"]
    for flag, value in (("--weights", args.weights), ("--vae", args.vae)):
        if value:
            command += [flag, value]
    return f"done: {mapper_path} (try `{shlex.join(command)}`)"


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)  # 128 + SIGINT; the run has said where it stopped
