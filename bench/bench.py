"""Speed and memory of our SDXL, beside diffusers on the same card, in one run.

    python -m bench.bench                                   # ours alone (from the repository root)
    python -m bench.bench --vs-diffusers --json bench.json  # + diffusers with the same weights, and the ratios
    python -m bench.bench --tiny --vs-diffusers             # every section at a tiny size: checks this script on a CPU
    bash bench/gpu_run.sh                                   # gpu_check.py, then this, as BENCHMARKS.md reports it

No weights are downloaded. Every model is built at the official SDXL shapes (diffusers' official
configs are in tests/data/sdxl_keys.json) with random weights of a realistic scale; speed does
not depend on their values. With --vs-diffusers the weights are drawn once, in diffusers' and
transformers' modules, and ours are the same tensors renamed by model/checkpoint.py's
`from_diffusers`, so both sides compute the same function on the same card in the same run.

What is measured, in this order (BENCHMARKS.md says how to read each number):
    UNet step        one ε̂ evaluation at batch 2 (the two halves of classifier-free guidance),
                     1024 px (128 x 128 latents)
    VAE decode       one 1024 px image from its latent
    image            a whole 30-step 1024 px image: both text encoders, 30 UNet steps, VAE decode
    training step    one CoCoIns triplet: 5 UNet passes, the 3 with gradients batched (batch 3,
                     backward to the conditioning only, the UNet frozen), the 2 without batched
                     (batch 2, no_grad); at 1024 and 512 px, with and without gradient checkpointing
    offload          the image with --offload (models in host memory, lent to the GPU while they run)
    compiled         `--compile` regional and full: first image including compilation, then the
                     image and the UNet step; compiled kernels go to a fresh cache (a cold start)
    load             SDXL.load of an official-size single file (fp16 on disk -> bf16 on the GPU),
                     with the file evicted from the page cache first
    then, as the budget allows: diffusers' compiled pipelines, our compiled training step
Peak memory is torch.cuda.max_memory_allocated during the measurement, counted as if the GPU held
nothing but the weights that the measured code uses (the other side's weights may be resident too).

Sections run in that order of priority; one that fails prints `skipped: <why>` and the run goes
on; past --budget-s the remaining ones are skipped. The table is printed as rows come in, again
at the end, and the JSON is rewritten after every section, so a run that is killed keeps its rows.

Read next: bench/BENCHMARKS.md (targets and results), bench/gpu_check.py (numerical parity on the GPU).
"""

import argparse
import datetime
import functools
import gc
import json
import math
import os
import statistics
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from model import checkpoint, clip, speed, unet, vae
from model.checkpoint import PREFIX
from model.sdxl import SDXL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
KEYS = os.path.join(ROOT, "tests", "data", "sdxl_keys.json")
PROMPT = "a photo of a woman reading a book in a sunlit cafe"
GUIDANCE = 5.0

# ---------------------------------------------------------------------------------------------
# Sizes: the official SDXL, and a tiny one of the same topology for running this script on a CPU
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Size:
    name: str
    image: int  # sampling width = height (px)
    train: tuple[int, ...]  # training resolutions (px), the first one the headline
    steps: int  # DDIM steps per image
    unet: unet.UNetConfig
    vae: vae.VAEConfig
    clip_l: clip.CLIPTextConfig
    clip_g: clip.OpenCLIPTextConfig
    diffusers: dict  # the same four models (and the scheduler) as diffusers/transformers configs


def official_size() -> Size:
    with open(KEYS) as f:
        configs = json.load(f)["diffusers_configs"]
    return Size("official", 1024, (1024, 512), 30, unet.UNetConfig(), vae.VAEConfig(), clip.CLIPTextConfig(),
                clip.OpenCLIPTextConfig(), configs)


def tiny_size() -> Size:
    """One UNet level (64 channels, one 64-wide head, one transformer block), an 8x VAE of 32
    channels, two-layer text encoders: every code path of the official size, few compiled graphs."""
    with open(KEYS) as f:
        scheduler = json.load(f)["diffusers_configs"]["scheduler"]
    clip_common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0,
                       eos_token_id=2, pad_token_id=1)
    diffusers = {
        "unet": dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64,),
                     down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                     transformer_layers_per_block=(1,), attention_head_dim=(1,), cross_attention_dim=64 + 128,
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=32 + 6 * 256, norm_num_groups=32),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
                    block_out_channels=(32,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=vae.SCALING_FACTOR, force_upcast=False),
        "text_encoder": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
                             hidden_act="quick_gelu", **clip_common),
        "text_encoder_2": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
                               hidden_act="gelu", projection_dim=32, **clip_common),
        "scheduler": scheduler,
    }
    return Size(
        "tiny", 64, (64, 32), 30,
        unet.UNetConfig(model_channels=64, channel_mult=(1,), num_res_blocks=1, transformer_depth=(1,),
                        transformer_depth_middle=1, context_dim=64 + 128, adm_in_channels=32 + 6 * 256),
        vae.VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1),
        clip.CLIPTextConfig(width=64, layers=2, heads=1, mlp_width=256),
        clip.OpenCLIPTextConfig(width=128, layers=2, heads=2, mlp_width=512, projection_dim=32),
        diffusers,
    )


# ---------------------------------------------------------------------------------------------
# Random weights at those shapes, ours alone or drawn in diffusers' modules and shared
# ---------------------------------------------------------------------------------------------

def build(name: str, sd: dict) -> torch.nn.Module:
    """Our model `name` from official-name tensors (assigned: no copy), with the memory-saving
    modules sample.py and train.py use."""
    return speed.save_memory(checkpoint.build(name, sd))[0]


BUILD = {name: functools.partial(build, name) for name in checkpoint.MODULES}


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights of a realistic scale, drawn on the module's device (fast on a GPU, and
    never PyTorch's default init, which takes minutes for 2.6 B parameters on a CPU):
    norm scales 1 + 0.1·z, biases 0.05·z, matrices z/√fan_in (activations keep unit scale, so
    bfloat16 behaves as with real weights). Biases and norms are random so that a wrongly mapped
    one cannot hide behind zeros and ones."""
    device = next(module.parameters()).device
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            z = torch.randn(p.shape, generator=g, device=device)
            if p.ndim == 1:
                z = 1 + 0.1 * z if name.endswith("weight") else 0.05 * z
            else:
                z = z / math.sqrt(p[0].numel())
            p.copy_(z)
    return module


def build_ours(size: Size, device, dtype, seed=0) -> dict[str, torch.nn.Module]:
    """Our four models with random weights: built on meta, then given memory on `device`."""
    with torch.device("meta"):
        models = {"clip_l": clip.CLIPTextModel(size.clip_l), "clip_g": clip.OpenCLIPTextModel(size.clip_g),
                  "unet": unet.UNet(size.unet), "vae": vae.AutoencoderKL(size.vae)}
    for i, m in enumerate(models.values()):
        randomize_(m.to(dtype).to_empty(device=device), seed + i).eval().requires_grad_(False)
    speed.save_memory(*models.values())
    return models


MODELS = ("clip_l", "clip_g", "unet", "vae")


def build_diffusers(size: Size, device, dtype, seed=0, names=MODELS) -> dict[str, torch.nn.Module]:
    """diffusers' UNet and VAE and transformers' two text encoders at `size` (those in `names`),
    random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg, models = size.diffusers, {}
    with torch.device("meta"):
        if "unet" in names:
            models["unet"] = UNet2DConditionModel(**cfg["unet"])
        if "vae" in names:
            models["vae"] = AutoencoderKL(**cfg["vae"])
    for m in models.values():
        m.to(dtype).to_empty(device=device)
    # The text encoders have a buffer (position_ids) that only their own init fills: built in place.
    with torch.device(device):
        if "clip_l" in names:
            models["clip_l"] = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
        if "clip_g" in names:
            models["clip_g"] = CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"]))
    for i, name in enumerate(MODELS):
        if name in models:
            randomize_(models[name].to(dtype), seed + i).eval().requires_grad_(False)
    return {name: models[name] for name in MODELS if name in models}


# The loader's renaming of the diffusers/transformers layout into official names, per model.
FROM_DIFFUSERS = {name: functools.partial(checkpoint.from_diffusers, name) for name in checkpoint.MODULES}


def ours_from_diffusers(theirs: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """Our models holding diffusers' tensors, renamed (bigG's q/k/v are concatenated: a copy)."""
    return {name: BUILD[name](FROM_DIFFUSERS[name](m.state_dict())) for name, m in theirs.items()}


def same_weights(models: dict[str, torch.nn.Module]) -> dict[str, torch.nn.Module]:
    """New module objects on the same tensors (to compile or offload without touching the originals)."""
    return {name: BUILD[name](m.state_dict()) for name, m in models.items()}


@functools.cache
def tokenizers() -> tuple[clip.Tokenizer, clip.Tokenizer]:
    return clip.Tokenizer.bundled(pad="eos"), clip.Tokenizer.bundled(pad="!")


def make_sdxl(models: dict, device, dtype) -> SDXL:
    tok_l, tok_g = tokenizers()
    return SDXL(tok_l=tok_l, tok_g=tok_g, clip_l=models["clip_l"], clip_g=models["clip_g"], unet=models["unet"],
                vae=models["vae"], device=device, dtype=dtype)


def make_pipeline(theirs: dict, size: Size, tmp: str, unet_=None, vae_=None):
    """diffusers' StableDiffusionXLPipeline on `theirs` (optionally another UNet / VAE object)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    from tests.tiny_sdxl import _write_tokenizer_files

    tok = _write_tokenizer_files(os.path.join(tmp, "tokenizer"), "<|endoftext|>")
    tok_2 = _write_tokenizer_files(os.path.join(tmp, "tokenizer_2"), "!")
    pipe = StableDiffusionXLPipeline(
        vae=vae_ or theirs["vae"], text_encoder=theirs["clip_l"], text_encoder_2=theirs["clip_g"], tokenizer=tok,
        tokenizer_2=tok_2, unet=unet_ or theirs["unet"], scheduler=DDIMScheduler(**size.diffusers["scheduler"]),
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fresh_diffusers(module, kind: str, size: Size):
    """A new diffusers UNet or VAE object on the same tensors (to compile it without touching the original)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if kind == "unet" else AutoencoderKL
    with torch.device("meta"):
        new = cls(**size.diffusers[kind])
    new.load_state_dict(module.state_dict(), assign=True)
    return new.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, warmup: int, iters: int) -> float:
    """Median wall time of `fn` in ms, the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile_ms(fn, device, iters: int = 3) -> dict:
    """Where the time of one call of `fn` goes (averages over `iters` calls after a warm-up):
        wall      host time from the call to the device finishing it
        launch    host time until the call returns, the device not waited for: the CPU's cost
                  of issuing the work (Python, dispatch, kernel launches)
        gpu_busy  the sum of the device's kernel and copy durations (torch.profiler, GPU only)
        kernels   how many kernels and copies the device ran
    gpu_busy close to wall: the GPU is the bottleneck; launch close to wall with gpu_busy well
    below it: the CPU is, and CUDA graphs (--cuda-graphs) pay. wall and launch are timed without
    the profiler, which traces only the GPU (tracing the CPU's ops would slow the host down)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    launch, wall = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        sync(device)
        launch.append(t1 - t0)
        wall.append(time.perf_counter() - t0)
    kernels, by_name = [], {}
    if device.type == "cuda":
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                fn()
                sync(device)
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        for e in kernels:
            by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time_total / 1e3 / iters
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:8]
    return dict(wall=statistics.median(wall) * 1e3, launch=statistics.median(launch) * 1e3,
                gpu_busy=sum(by_name.values()), kernels=len(kernels) // iters,
                top=[(name[:90], round(ms, 3)) for name, ms in top])


def cold_start(cache_dir: str | None):
    """Forget what this process compiled so far and send compiled kernels to `cache_dir`: an
    empty folder, so that the next first image pays its whole compilation (as a program's first
    run does); None keeps the folder, whose kernels the next compilation reads back (as a
    program's next run does)."""
    torch._dynamo.reset()  # compiled code is cached per Python function, shared by every module
    if cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        # GPU kernels go to Triton's own folder, which inductor fixes once unless it is named
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cache_dir, "triton")
    try:
        from torch._inductor.utils import clear_caches

        clear_caches()  # kernels and graphs already loaded in this process
    except Exception as e:  # an internal API: if it moved, the row is warmer than it says, and says so
        print(f"  (cold_start: could not clear inductor's in-process caches: {type(e).__name__}: {e})", flush=True)


def weight_bytes(*modules) -> int:
    """Bytes of the distinct tensors of `modules` (shared tensors counted once)."""
    seen = {}
    for m in modules:
        for t in (*m.parameters(), *m.buffers()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


@contextmanager
def peak_memory(device, resident_bytes: int):
    """out["gib"] = peak GPU memory of the block, counted as `resident_bytes` (the weights the
    block uses) plus what the block allocated on top of whatever was already there."""
    out = {"gib": None}
    if device.type != "cuda":
        yield out
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield out
    sync(device)
    out["gib"] = (resident_bytes + torch.cuda.max_memory_allocated(device) - before) / 2**30


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """‖a − ref‖ / ‖ref‖ over all elements, in float64."""
    a, ref = a.double(), ref.double()
    return ((a - ref).norm() / ref.norm()).item()


def unet_inputs(size: Size, batch: int, res: int, device, dtype, seed=0):
    """(x_t, t, context, pooled, time_ids) for one UNet call at `res` px."""
    g = torch.Generator("cpu").manual_seed(seed)
    h, cfg = res // 8, size.unet
    pooled_dim = cfg.adm_in_channels - 6 * cfg.time_id_dim

    def randn(*shape):
        return torch.randn(shape, generator=g).to(device, dtype)

    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    # float32 and contiguous, as SDXL.generate passes them: a compiled UNet (static shapes,
    # dtypes and strides) then serves the benchmark's calls and the sampling loop with one graph
    time_ids = torch.tensor([res, res, 0, 0, res, res], dtype=torch.float32, device=device).repeat(batch, 1)
    return randn(batch, 4, h, h), t, randn(batch, 77, cfg.context_dim), randn(batch, pooled_dim), time_ids


def call_diffusers_unet(d_unet, x, t, context, pooled, time_ids):
    return d_unet(x, t, encoder_hidden_states=context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
                  return_dict=False)[0]


# ---------------------------------------------------------------------------------------------
# The report: rows as they come, a table, a JSON file
# ---------------------------------------------------------------------------------------------

COLUMNS = ("row", "ours", "diffusers", "ours/diff", "ours GiB", "diff GiB", "target")


class Report:
    def __init__(self, path: str | None, meta: dict):
        self.path, self.meta, self.rows, self.skipped = path, meta, [], []

    def row(self, name, unit, ours=None, diffusers=None, ours_gib=None, diffusers_gib=None, target="", **extra):
        r = dict(name=name, unit=unit, ours=ours, diffusers=diffusers, ours_gib=ours_gib, diffusers_gib=diffusers_gib,
                 ratio=ours / diffusers if ours and diffusers else None, target=target, **extra)
        self.rows.append(r)
        print("  " + self._line(r) + "".join(f"  {k}={_fmt(v)}" for k, v in extra.items()), flush=True)
        self.save()

    def skip(self, section, why):
        self.skipped.append(dict(section=section, why=why))
        print(f"  skipped: {section}: {why}", flush=True)
        self.save()

    @staticmethod
    def _line(r):
        cells = (f"{r['name']} [{r['unit']}]", _fmt(r["ours"]), _fmt(r["diffusers"]),
                 f"{r['ratio']:.2f}x" if r["ratio"] else "-", _fmt(r["ours_gib"]), _fmt(r["diffusers_gib"]),
                 r["target"])
        return f"{cells[0]:<70}" + "".join(f"{c:>11}" for c in cells[1:6]) + f"  {cells[6]}"

    def table(self):
        print("\n" + f"{COLUMNS[0]:<70}" + "".join(f"{c:>11}" for c in COLUMNS[1:6]) + f"  {COLUMNS[6]}")
        for r in self.rows:
            print(self._line(r))
        for s in self.skipped:
            print(f"skipped: {s['section']}: {s['why']}")

    def save(self):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(dict(self.meta, rows=self.rows, skipped=self.skipped), f, indent=1)


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


# ---------------------------------------------------------------------------------------------
# The sections
# ---------------------------------------------------------------------------------------------


class Bench:
    """Models and inputs shared by the sections, built once."""

    def __init__(self, args, size: Size, device, dtype, report: Report, tmp: str):
        self.args, self.size, self.device, self.dtype, self.report, self.tmp = args, size, device, dtype, report, tmp
        self.theirs = None
        if args.vs_diffusers:
            try:
                self.theirs = build_diffusers(size, device, dtype)
            except Exception as e:  # diffusers missing or incompatible: ours alone, said loudly
                traceback.print_exc()
                report.skip("diffusers", f"cannot build diffusers' models ({type(e).__name__}: {e}); ours alone")
        self.ours = ours_from_diffusers(self.theirs) if self.theirs else build_ours(size, device, dtype)
        self.sdxl = make_sdxl(self.ours, device, dtype)
        self.pipe = None
        if self.theirs:
            try:
                self.pipe = make_pipeline(self.theirs, size, tmp)
            except Exception as e:
                traceback.print_exc()
                report.skip("diffusers pipeline", f"cannot build it ({type(e).__name__}: {e})")
        self.step_inputs = unet_inputs(size, 2, size.image, device, dtype)
        self.eager_eps = None  # our eager UNet step's output, to compare compiled ones with
        self.eager_image = None

    # -- UNet step, VAE decode, image: eager ----------------------------------------------------

    def unet_step(self):
        d = self.device
        ours = self.ours["unet"]
        with torch.no_grad():
            self.eager_eps = ours(*self.step_inputs)
            with peak_memory(d, weight_bytes(ours)) as mem:
                ms = time_ms(lambda: ours(*self.step_inputs), d, *self.iters(3, 10))
            theirs_ms = theirs_gib = check = None
            if self.theirs:
                dunet = self.theirs["unet"]
                check = rel_err(self.eager_eps, call_diffusers_unet(dunet, *self.step_inputs))
                with peak_memory(d, weight_bytes(dunet)) as dmem:
                    theirs_ms = time_ms(lambda: call_diffusers_unet(dunet, *self.step_inputs), d, *self.iters(3, 10))
                theirs_gib = dmem["gib"]
        self.report.row(f"UNet step, batch 2, {self.size.image} px, eager", "ms", ms, theirs_ms, mem["gib"], theirs_gib,
                        "<= 55 ms", **({"rel_diff_vs_diffusers": check} if check is not None else {}))
        # The same step as a sampling loop runs it: 30 calls back to back, one synchronisation at
        # the end (the host queues step n+1 while the GPU runs step n).
        with torch.no_grad():
            loop = lambda m: (lambda: [m(*self.step_inputs) for _ in range(self.size.steps)])  # noqa: E731
            ms = time_ms(loop(ours), d, *self.iters(1, 2)) / self.size.steps
            theirs_ms = None
            if self.theirs:
                dunet = self.theirs["unet"]
                theirs_ms = time_ms(loop(lambda *a: call_diffusers_unet(dunet, *a)), d, *self.iters(1, 2)) / self.size.steps
        self.report.row(f"UNet step in a loop of {self.size.steps}, eager", "ms", ms, theirs_ms)

    def unet_profile(self):
        """Kernel time against wall time, eager: is a step bound by the GPU or by the host?"""
        d, ours = self.device, self.ours["unet"]
        with torch.no_grad():
            prof = profile_ms(lambda: ours(*self.step_inputs), d)
            theirs = None
            if self.theirs:
                theirs = profile_ms(lambda: call_diffusers_unet(self.theirs["unet"], *self.step_inputs), d)
        for what in ("wall", "launch", "gpu_busy"):
            self.report.row(f"UNet step profile: {what}", "ms", prof[what], theirs and theirs[what])
        self.report.row("UNet step profile: kernels per step", "n", prof["kernels"], theirs and theirs["kernels"],
                        top_kernels_ours=prof["top"], **({"top_kernels_diffusers": theirs["top"]} if theirs else {}))

    def cuda_graphs(self):
        """--cuda-graphs on the eager UNet: the step, and the whole image."""
        d = self.device
        if d.type != "cuda":
            self.report.skip("--cuda-graphs", "needs a CUDA GPU")
            return
        sdxl = make_sdxl(self.ours, d, self.dtype)
        speed.enable_cuda_graphs(sdxl)
        graphed = sdxl.graphed_unet
        with torch.no_grad():
            reserved = torch.cuda.memory_reserved(d)
            eps = graphed(*self.step_inputs)  # records the graph
            # the recording's activations stay in its own memory pool: reserved, not allocated
            recording_gib = (torch.cuda.memory_reserved(d) - reserved) / 2**30
            with peak_memory(d, weight_bytes(self.ours["unet"])) as mem:
                ms = time_ms(lambda: graphed(*self.step_inputs), d, *self.iters(2, 10))
        extra = {"recording_reserved_gib": recording_gib}
        if self.eager_eps is not None:
            extra["rel_diff_vs_eager"] = rel_err(eps, self.eager_eps)
        self.report.row(f"UNet step, batch 2, {self.size.image} px, eager + --cuda-graphs", "ms", ms, None, mem["gib"],
                        None, "<= 55 ms", **extra)
        with peak_memory(d, weight_bytes(*self.ours.values())) as mem:
            image = self.generate(sdxl)
            s = time_ms(lambda: self.generate(sdxl), d, 0, 1) / 1e3
        extra = {}
        if self.eager_image is not None:
            extra["mean_abs_pixel_diff_vs_eager"] = float(np.abs(image.astype(int) - self.eager_image).mean())
        self.report.row(f"image, {self.size.steps} steps, {self.size.image} px, eager + --cuda-graphs", "s", s, None,
                        mem["gib"], None, "<= 2.5 s, <= 8 GiB", **extra)

    def vae_decode(self):
        d, h = self.device, self.size.image // 8
        z = torch.randn(1, 4, h, h, generator=torch.Generator("cpu").manual_seed(1)).to(d, self.dtype)
        with torch.no_grad():
            ours = self.ours["vae"]
            with peak_memory(d, weight_bytes(ours)) as mem:
                ms = time_ms(lambda: ours.decode(z), d, *self.iters(2, 5))
            theirs_ms = theirs_gib = None
            if self.theirs:
                dvae = self.theirs["vae"]
                with peak_memory(d, weight_bytes(dvae)) as dmem:
                    theirs_ms = time_ms(lambda: dvae.decode(z, return_dict=False)[0], d, *self.iters(2, 5))
                theirs_gib = dmem["gib"]
        self.report.row(f"VAE decode, {self.size.image} px, eager", "ms", ms, theirs_ms, mem["gib"], theirs_gib)

    def generate(self, sdxl):
        return sdxl.generate([PROMPT], [0], steps=self.size.steps, guidance=GUIDANCE, width=self.size.image,
                             height=self.size.image)[0]

    def pipeline_image(self, pipe):
        out = pipe(prompt=PROMPT, num_inference_steps=self.size.steps, guidance_scale=GUIDANCE, width=self.size.image,
                   height=self.size.image, generator=torch.Generator("cpu").manual_seed(0), output_type="np")
        return (out.images[0] * 255).round().astype(np.uint8)

    def image(self):
        d = self.device
        with peak_memory(d, weight_bytes(*self.ours.values())) as mem:
            self.eager_image = self.generate(self.sdxl)  # also the warm-up
            s = time_ms(lambda: self.generate(self.sdxl), d, 0, 1) / 1e3
        theirs_s = theirs_gib = None
        extra = {}
        if self.pipe:
            with peak_memory(d, weight_bytes(*self.theirs.values())) as dmem:
                theirs_image = self.pipeline_image(self.pipe)
                theirs_s = time_ms(lambda: self.pipeline_image(self.pipe), d, 0, 1) / 1e3
            theirs_gib = dmem["gib"]
            # the same weights, prompt and seed: the images differ by bfloat16 rounding only
            diff = np.abs(self.eager_image.astype(int) - theirs_image)
            extra["mean_abs_pixel_diff_vs_diffusers"] = float(diff.mean())
        self.report.row(f"image, {self.size.steps} steps, {self.size.image} px, eager", "s", s, theirs_s, mem["gib"],
                        theirs_gib, "<= 2.5 s, <= 8 GiB", **extra)

    # -- training step ----------------------------------------------------------------------------

    def training(self):
        for res in self.size.train:
            for checkpointing in (False, True):
                ours = self.ours["unet"]
                ours.gradient_checkpointing = checkpointing
                try:
                    ms, gib = self.train_step_time(ours, res, call=lambda *a: ours(*a))
                finally:
                    ours.gradient_checkpointing = False
                theirs_ms = theirs_gib = None
                if self.theirs:
                    dunet = self.theirs["unet"]
                    dunet.enable_gradient_checkpointing() if checkpointing else dunet.disable_gradient_checkpointing()
                    dunet.train()  # diffusers checkpoints only in training mode (SDXL has no dropout)
                    try:
                        theirs_ms, theirs_gib = self.train_step_time(
                            dunet, res, call=lambda *a: call_diffusers_unet(dunet, *a))
                    finally:
                        dunet.disable_gradient_checkpointing()
                        dunet.eval()
                target = "" if res != self.size.train[0] else (
                    "<= 250 ms, <= 8 GiB" if checkpointing else "<= 120 ms, <= 20 GiB")
                self.report.row(f"training step (triplet), {res} px{', checkpointing' if checkpointing else ''}", "ms",
                                ms, theirs_ms, gib, theirs_gib, target)

    def training_profile(self):
        """Kernel time against wall time for one training triplet, at each resolution."""
        ours = self.ours["unet"]
        for res in self.size.train:
            prof = self.train_step_time(ours, res, call=lambda *a: ours(*a), profile=True)
            self.report.row(f"training step (triplet), {res} px, profile: wall / launch / gpu_busy", "ms", prof["wall"],
                            None, launch_ms=prof["launch"], gpu_busy_ms=prof["gpu_busy"], kernels=prof["kernels"],
                            top_kernels=prof["top"])

    def train_step_time(self, module, res, call, warmup=None, profile=False):
        """One CoCoIns triplet: 3 passes with gradients to the conditioning (batched), 2 without."""
        d = self.device
        x3, t3, context3, pooled3, ids3 = unet_inputs(self.size, 3, res, d, self.dtype, seed=2)
        free = unet_inputs(self.size, 2, res, d, self.dtype, seed=3)
        # the mapper's pseudo-words reach the UNet through both text encoders: context and pooled
        context3.requires_grad_(True)
        pooled3.requires_grad_(True)

        def step():
            with torch.no_grad():
                eps_free = call(*free)
            eps = call(x3, t3, context3, pooled3, ids3)
            loss = eps.float().square().mean() + (eps[:2].float() - eps_free.float()).square().mean()
            loss.backward()
            context3.grad = pooled3.grad = None

        if profile:
            return profile_ms(step, d, iters=2)
        with peak_memory(d, weight_bytes(module)) as mem:
            ms = time_ms(step, d, *self.iters(*(warmup or (2, 5))))
        return ms, mem["gib"]

    # -- offload -----------------------------------------------------------------------------------

    def offload(self):
        d = self.device
        host = {name: BUILD[name]({k: v.to("cpu") for k, v in m.state_dict().items()}) for name, m in self.ours.items()}
        sdxl = make_sdxl(host, "cpu", self.dtype)
        speed.enable_offload(sdxl, d)
        with peak_memory(d, 0) as mem:
            image = self.generate(sdxl)  # also the warm-up
            s = time_ms(lambda: self.generate(sdxl), d, 0, 1) / 1e3
        extra = {}
        if self.eager_image is not None:
            extra["same_image_as_without_offload"] = bool(np.array_equal(image, self.eager_image))
        self.report.row(f"image, {self.size.steps} steps, {self.size.image} px, --offload", "s", s, None, mem["gib"],
                        None, "<= 6 GiB", **extra)

    # -- compiled ------------------------------------------------------------------------------

    def compiled(self, mode: str):
        """First image including compilation, then image and UNet step, for `--compile mode`.

        `transformer blocks` is an experiment, not a flag: only the 70 transformer blocks
        compiled (2 graphs, as diffusers' regional recipe), the ResBlocks eager. With CUDA graphs
        hiding the eager parts' launches, it may reach regional's speed with a fraction of its
        compilation (ResBlocks are 12 of regional's 14 graphs)."""
        d = self.device
        cold_start(os.path.join(self.tmp, "inductor_cache_" + mode.replace(" ", "_")))
        sdxl, image, first_s = self.first_compiled_image(mode)
        s = time_ms(lambda: self.generate(sdxl), d, 0, 1) / 1e3
        with torch.no_grad():
            eps = sdxl.unet(*self.step_inputs)
            with peak_memory(d, weight_bytes(sdxl.unet)) as mem:
                ms = time_ms(lambda: sdxl.unet(*self.step_inputs), d, *self.iters(2, 10))
        extra = {}
        if self.eager_eps is not None:
            extra["rel_diff_vs_eager"] = rel_err(eps, self.eager_eps)
        if self.eager_image is not None:
            extra["mean_abs_pixel_diff_vs_eager"] = float(np.abs(image.astype(int) - self.eager_image).mean())
        self.report.row(f"first image incl. compilation, --compile {mode}", "s", first_s, None, None, None, "<= 20 s")
        # the same in a program's next run: compiled code forgotten, the cache folder kept
        cold_start(None)
        _, _, warm_s = self.first_compiled_image(mode)
        self.report.row(f"first image incl. compilation, --compile {mode}, warm cache (a program's next run)", "s",
                        warm_s, None, None, None, "<= 20 s")
        self.report.row(f"image, {self.size.steps} steps, {self.size.image} px, --compile {mode}", "s", s, None, None,
                        None, "<= 1.0 s")
        self.report.row(f"UNet step, batch 2, {self.size.image} px, --compile {mode}", "ms", ms, None, mem["gib"], None,
                        "<= 26 ms", **extra)
        # and replayed as a CUDA graph (--compile MODE --cuda-graphs)
        if d.type != "cuda":
            return
        speed.enable_cuda_graphs(sdxl)
        t0 = time.perf_counter()
        image = self.generate(sdxl)  # records the graph
        sync(d)
        record_s = time.perf_counter() - t0
        s = time_ms(lambda: self.generate(sdxl), d, 0, 1) / 1e3
        with torch.no_grad():
            ms = time_ms(lambda: sdxl.graphed_unet(*self.step_inputs), d, *self.iters(2, 10))
        extra = {"first_image_with_recording_s": record_s}
        if self.eager_image is not None:
            extra["mean_abs_pixel_diff_vs_eager"] = float(np.abs(image.astype(int) - self.eager_image).mean())
        self.report.row(f"image, {self.size.steps} steps, {self.size.image} px, --compile {mode} --cuda-graphs", "s", s,
                        None, None, None, "<= 1.0 s", **extra)
        self.report.row(f"UNet step, batch 2, {self.size.image} px, --compile {mode} --cuda-graphs", "ms", ms, None,
                        None, None, "<= 26 ms")

    def first_compiled_image(self, mode: str):
        """(SDXL compiled in `mode`, its first image, seconds from compile() to the image in hand)."""
        d = self.device
        sdxl = make_sdxl(same_weights(self.ours), d, self.dtype)
        sync(d)
        t0 = time.perf_counter()
        if mode == "transformer blocks":
            for m in sdxl.unet.modules():
                if isinstance(m, unet.BasicTransformerBlock):
                    m.compile(dynamic=False, fullgraph=True)
        else:
            speed.compile(sdxl, mode)
        image = self.generate(sdxl)
        sync(d)
        return sdxl, image, time.perf_counter() - t0

    def training_compiled(self):
        res = self.size.train[0]
        cold_start(os.path.join(self.tmp, "inductor_cache_training"))
        ours = speed.compile_unet(BUILD["unet"](self.ours["unet"].state_dict()), "regional")
        sync(self.device)
        t0 = time.perf_counter()
        self.train_step_time(ours, res, call=lambda *a: ours(*a), warmup=(0, 1))
        first_s = time.perf_counter() - t0
        for checkpointing in (False, True):
            ours.gradient_checkpointing = checkpointing
            ms, gib = self.train_step_time(ours, res, call=lambda *a: ours(*a))
            self.report.row(f"training step (triplet), {res} px{', checkpointing' if checkpointing else ''}, "
                            "--compile regional", "ms", ms, None, gib, None,
                            "<= 250 ms, <= 8 GiB" if checkpointing else "<= 120 ms, <= 20 GiB",
                            **({} if checkpointing else {"first_step_incl_compilation_s": first_s}))

    # -- diffusers compiled ----------------------------------------------------------------------

    def diffusers_compiled(self, mode: str):
        """diffusers' own recipes with torch.compile's defaults: regional = compile_repeated_blocks
        (its BasicTransformerBlocks); full = the whole UNet and the VAE decoder (as DESIGN.md's
        1.21 s figure was measured)."""
        d = self.device
        cold_start(os.path.join(self.tmp, f"inductor_cache_diffusers_{mode}"))
        dunet = fresh_diffusers(self.theirs["unet"], "unet", self.size)
        dvae = fresh_diffusers(self.theirs["vae"], "vae", self.size) if mode == "full" else None
        pipe = make_pipeline(self.theirs, self.size, self.tmp, unet_=dunet, vae_=dvae)
        sync(d)
        t0 = time.perf_counter()
        if mode == "regional":
            dunet.compile_repeated_blocks()
        else:
            dunet.compile()
            dvae.decoder.compile()
        self.pipeline_image(pipe)
        sync(d)
        first_s = time.perf_counter() - t0
        s = time_ms(lambda: self.pipeline_image(pipe), d, 0, 1) / 1e3
        with torch.no_grad():
            with peak_memory(d, weight_bytes(dunet)) as mem:
                ms = time_ms(lambda: call_diffusers_unet(dunet, *self.step_inputs), d, *self.iters(2, 10))
        self.report.row(f"first image incl. compilation, diffusers {mode} compile", "s", None, first_s)
        self.report.row(f"image, {self.size.steps} steps, {self.size.image} px, diffusers {mode} compile", "s", None, s)
        self.report.row(f"UNet step, batch 2, {self.size.image} px, diffusers {mode} compile", "ms", None, ms, None,
                        mem["gib"])

    # -- load ------------------------------------------------------------------------------------

    def load(self):
        """SDXL.load of an official-layout single file as the official one is stored (fp16)."""
        from safetensors.torch import save_file

        path = os.path.join(self.tmp, "sdxl_random_weights.safetensors")
        tensors = {PREFIX[name] + k: v.to(torch.float16).cpu().contiguous()
                   for name, m in self.ours.items() for k, v in m.state_dict().items()}
        save_file(tensors, path)
        del tensors
        size_gb = os.path.getsize(path) / 1e9
        # A cold start reads the file from disk: flush it, then drop it from the page cache.
        os.sync()
        cold = hasattr(os, "posix_fadvise")
        if cold:
            fd = os.open(path, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        d = self.device
        with peak_memory(d, 0) as mem:
            sync(d)
            t0 = time.perf_counter()
            model = SDXL.load(path, device=d, dtype=self.dtype)
            sync(d)
            s = time.perf_counter() - t0
        del model
        os.remove(path)
        self.report.row(f"load {size_gb:.1f} GB single file (fp16 -> {str(self.dtype)[6:]})", "s", s, None, mem["gib"],
                        None, page_cache="cold" if cold else "warm")

    def iters(self, warmup, iters):
        return (1, 2) if self.args.tiny else (warmup, iters)


# Sections in order of priority, with the seconds each takes on one H200 (a guess before the
# first measurement): one is skipped when less than that is left of --budget-s.
SECTIONS = [
    ("UNet step", 20, lambda b: b.unet_step()),
    ("UNet step profile", 8, lambda b: b.unet_profile()),
    ("VAE decode", 3, lambda b: b.vae_decode()),
    ("image", 15, lambda b: b.image()),
    ("--cuda-graphs", 10, lambda b: b.cuda_graphs()),
    ("training step", 22, lambda b: b.training()),
    ("training step profile", 10, lambda b: b.training_profile()),
    ("offload", 15, lambda b: b.offload()),
    ("--compile regional", 55, lambda b: b.compiled("regional")),
    ("--compile transformer blocks (experiment)", 35, lambda b: b.compiled("transformer blocks")),
    ("--compile full", 200, lambda b: b.compiled("full")),
    ("load", 35, lambda b: b.load()),
    ("diffusers regional compile", 40, lambda b: b.diffusers_compiled("regional")),
    ("training step --compile regional", 50, lambda b: b.training_compiled()),
    ("diffusers full compile", 120, lambda b: b.diffusers_compiled("full")),
]
NEEDS_PIPELINE = {"diffusers regional compile", "diffusers full compile"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vs-diffusers", action="store_true", help="run diffusers with the same weights beside ours")
    p.add_argument("--tiny", action="store_true", help="tiny models and images: checks this script on a CPU")
    p.add_argument("--budget-s", type=float, default=None,
                   help="skip the sections that no longer fit in this many seconds")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after every section)")
    p.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    return p.parse_args(argv)


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    # First images are measured cold: compiled kernels go to an empty cache folder, never to one
    # that an earlier run (or gpu_check.py) filled.
    tmp = tempfile.mkdtemp(prefix="bench_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tmp, "inductor_cache")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    # bfloat16 on a GPU, as sample.py runs; float32 on a CPU, where bfloat16 only emulates
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size = tiny_size() if args.tiny else official_size()
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), device=_device_name(device),
                dtype=str(dtype)[6:], size=size.name, torch=torch.__version__, versions=_versions())
    report = Report(args.json, meta)
    print(f"bench: {meta['device']}, torch {torch.__version__}, {meta['dtype']}, {size.name} size, "
          f"{'vs diffusers' if args.vs_diffusers else 'ours alone'}", flush=True)

    bench = Bench(args, size, device, dtype, report, tmp)
    print(f"  models built in {time.perf_counter() - start:.1f} s", flush=True)
    try:
        for name, need_s, run in SECTIONS:
            if name in NEEDS_PIPELINE and bench.pipe is None:
                continue
            left = args.budget_s - (time.perf_counter() - start) if args.budget_s else math.inf
            if not args.tiny and left < need_s:
                report.skip(name, f"{left:.0f} s left of --budget-s {args.budget_s:.0f}, it needs about {need_s} s")
                continue
            print(f"[{time.perf_counter() - start:6.1f} s] {name}", flush=True)
            try:
                run(bench)
            except Exception as e:
                traceback.print_exc()
                report.skip(name, f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    except KeyboardInterrupt:  # gpu_run.sh's time limit: keep what was measured
        report.skip("the remaining sections", "interrupted")
    report.table()
    print(f"bench: done in {time.perf_counter() - start:.0f} s", flush=True)


def _device_name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _versions() -> dict:
    out = {}
    for name in ("diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # reported, not fatal: ours runs without them
            out[name] = f"unavailable ({type(e).__name__})"
    return out


if __name__ == "__main__":
    main()
