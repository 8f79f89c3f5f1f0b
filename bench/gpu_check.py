"""Numerical parity of our SDXL with diffusers and transformers, at full size, on the GPU.

    python -m bench.gpu_check           # the official shapes on the GPU (about 1.5 minutes on one H200, a guess since the image and gradient checks were added)
    python -m bench.gpu_check --tiny    # the same checks on tiny models: checks this script on a CPU
    bash bench/gpu_run.sh               # this, then bench.py, as BENCHMARKS.md reports them

The CPU tests compare every model with its reference at tiny sizes; this script does it where the
fast paths run, at the official shapes. For each model (both text encoders, the UNet, the VAE)
the diffusers/transformers module is built from the official config with random weights of a
realistic scale (bench.py `randomize_`), ours holds the same tensors (model/checkpoint.py's
`from_diffusers`), both get the same inputs, and relative errors ‖a − b‖ / ‖b‖ are compared:

    float32    ours against theirs with TF32 off                                  limit 1e-3
    bfloat16   ours against their float32 output, beside their own bfloat16 error: limit twice
               theirs, or 1 %: bfloat16 may cost us no more accuracy than it costs diffusers
    backends   each attention backend (flash, efficient, cudnn, math) in bfloat16, same limit;
               the VAE's 512-wide head under `flash` must fall back, not fail
    gradient   the UNet's gradient to the conditioning (training's backward, through our GroupNorm
               and GEGLU autograd functions) at half resolution: float32 against diffusers,
               bfloat16 against float32 beside diffusers' own bfloat16 error
    graphs     `--cuda-graphs` (the UNet step replayed from a recording) in bfloat16, same limit
    image      a whole float32 image (10 steps) against diffusers' StableDiffusionXLPipeline with
               the same weights, prompt and seed                       limit 1/255 mean difference
    compiled   `--compile` (regional) in bfloat16, same limit, and its distance to eager
    sync       the DDIM loop with our UNet: no host-device synchronisation added per step

One PASS/FAIL/SKIP line per check, a summary, and JSON in --json (default $OUT/gpu_check.json
when OUT is set). A check that raises is a FAIL with its error, and the others still run.

Read next: bench/bench.py (the speed side of the same run), bench/BENCHMARKS.md.
"""

import argparse
import functools
import json
import math
import os
import tempfile
import time
import traceback
import warnings

import numpy as np
import torch

from bench.bench import (BUILD, FROM_DIFFUSERS, PROMPT, build_diffusers, call_diffusers_unet, make_pipeline, make_sdxl,
                   official_size, ours_from_diffusers, rel_err, tiny_size, unet_inputs)
from model import attention, clip, ddim, speed
from model.speed import CUDAGraphed

FP32_LIMIT = 1e-3
BF16_FLOOR = 0.01  # the bfloat16 limit is max(2 × diffusers' own bfloat16 error, this)
FUSED = ("flash", "efficient", "cudnn")
# A prompt longer than 77 tokens: truncation must keep the end-of-text token in both.
LONG_PROMPT = ", ".join(["a woman reading a book in a sunlit cafe with plants and old wooden tables"] * 6)


class Checks:
    def __init__(self, path: str | None, meta: dict):
        self.path, self.meta, self.items = path, meta, []

    def _add(self, status, name, line, **fields):
        self.items.append(dict(status=status, name=name, **fields))
        print(f"{status}  {name}: {line}", flush=True)
        self.save()

    def check(self, name, value, limit, **info):
        ok = math.isfinite(value) and value <= limit
        extra = "".join(f", {k} {_fmt(v)}" for k, v in info.items())
        self._add("PASS" if ok else "FAIL", name, f"{_fmt(value)} (limit {_fmt(limit)}){extra}", value=value,
                  limit=limit, **info)

    def fail(self, name, why):
        self._add("FAIL", name, why, why=why)

    def skip(self, name, why):
        self._add("SKIP", name, why, why=why)

    def info(self, name, value, note=""):
        self._add("INFO", name, f"{_fmt(value)} {note}".strip(), value=value)

    def summary(self) -> int:
        counts = {s: sum(i["status"] == s for i in self.items) for s in ("PASS", "FAIL", "SKIP")}
        print(f"\ngpu_check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped", flush=True)
        for i in self.items:
            if i["status"] == "FAIL":
                print(f"  FAIL {i['name']}")
        return counts["FAIL"]

    def save(self):
        if self.path:
            with open(self.path, "w") as f:
                json.dump(dict(self.meta, checks=self.items), f, indent=1)


def _fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def conditioning_grad(call, inputs, probe):
    """d(Σ probe·ε̂)/d(context, pooled), flattened into one float32 vector."""
    x, t, context, pooled, time_ids = inputs
    context, pooled = context.clone().requires_grad_(True), pooled.clone().requires_grad_(True)
    (call(x, t, context, pooled, time_ids).float() * probe).sum().backward()
    return torch.cat([context.grad.float().flatten(), pooled.grad.float().flatten()])


def bf16_limit(theirs_err: float) -> float:
    return max(2 * theirs_err, BF16_FLOOR)


def to_bf16(name: str, model: torch.nn.Module) -> torch.nn.Module:
    """A bfloat16 copy of one of our models (its own tensors)."""
    return BUILD[name]({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})


class GPUCheck:
    def __init__(self, args):
        self.args, self.start = args, time.perf_counter()
        self.size = tiny_size() if args.tiny else official_size()
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        self.checks = Checks(args.json, dict(device=self.device_name, torch=torch.__version__, size=self.size.name,
                                             date=time.strftime("%Y-%m-%dT%H:%M:%S")))

    def guarded(self, name, fn):
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            self.checks.fail(name, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        finally:
            attention.set_backend("auto")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def unavailable(self, name, error):
        """A kernel that did not run: on a GPU a FAIL (every backend exists there), on a CPU a SKIP."""
        why = f"raised {type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
        (self.checks.fail if self.device.type == "cuda" else self.checks.skip)(name, why)

    def each_backend(self, name, run, ref, limit):
        """`run()` under every fused attention backend and math, against `ref`."""
        outs = {}
        for backend in (*FUSED, "math"):
            attention.set_backend(backend)
            try:
                outs[backend] = run()
            except RuntimeError as e:
                self.unavailable(f"{name} bf16 {backend}", e)
                continue
            finally:
                attention.set_backend("auto")
            self.checks.check(f"{name} bf16 {backend} vs fp32", rel_err(outs[backend], ref), limit)
        if "flash" in outs:
            self.checks.info(f"{name} bf16 flash vs math", rel_err(outs["flash"], outs["math"]))

    # -- text encoders ---------------------------------------------------------------------------

    def text_encoders(self):
        d = self.device
        theirs = build_diffusers(self.size, d, torch.float32, names=("clip_l", "clip_g"))
        ours = {name: BUILD[name](FROM_DIFFUSERS[name](m.state_dict())) for name, m in theirs.items()}
        prompts = [PROMPT, LONG_PROMPT]
        ids_l = clip.Tokenizer.bundled(pad="eos")(prompts).to(d)
        ids_g = clip.Tokenizer.bundled(pad="!")(prompts).to(d)

        def run_theirs():
            with torch.no_grad():
                out_l = theirs["clip_l"](input_ids=ids_l, output_hidden_states=True)
                out_g = theirs["clip_g"](input_ids=ids_g, output_hidden_states=True)
            return out_l.hidden_states[-2], out_g.hidden_states[-2], out_g.text_embeds

        def run_ours(models):
            with torch.no_grad():
                out_l, out_g = models["clip_l"].encode(ids_l), models["clip_g"].encode(ids_g)
            return out_l.penultimate, out_g.penultimate, out_g.pooled

        names = ("CLIP-L penultimate", "bigG penultimate", "bigG pooled")
        ref = run_theirs()
        for name, a, b in zip(names, run_ours(ours), ref):
            self.checks.check(f"{name} fp32 vs transformers", rel_err(a, b), FP32_LIMIT)
        ours16 = {name: to_bf16(name, m) for name, m in ours.items()}
        del ours
        for m in theirs.values():
            m.to(torch.bfloat16)
        limits = []
        for name, a, b, r in zip(names, run_ours(ours16), run_theirs(), ref):
            theirs_err = rel_err(b, r)
            limits.append(bf16_limit(theirs_err))
            self.checks.check(f"{name} bf16 vs fp32", rel_err(a, r), limits[-1], transformers_bf16=theirs_err)
        # bigG's causal attention through each backend (the pooled output passes through all of it)
        self.each_backend("bigG pooled", lambda: run_ours(ours16)[2], ref[2], limits[2])

    # -- VAE ------------------------------------------------------------------------------------

    def vae(self):
        d, res = self.device, self.size.image
        theirs = build_diffusers(self.size, d, torch.float32, names=("vae",))["vae"]
        ours = BUILD["vae"](FROM_DIFFUSERS["vae"](theirs.state_dict()))
        g = torch.Generator("cpu").manual_seed(6)
        image = (torch.rand(1, 3, res, res, generator=g) * 2 - 1).to(d)
        z = torch.randn(1, 4, res // 8, res // 8, generator=g).to(d)
        with torch.no_grad():
            ref_mean = theirs.encode(image).latent_dist.mean
            ref_x = theirs.decode(z).sample
            self.checks.check("VAE encode fp32 vs diffusers", rel_err(ours.encode(image).mean, ref_mean), FP32_LIMIT)
            self.checks.check("VAE decode fp32 vs diffusers", rel_err(ours.decode(z), ref_x), FP32_LIMIT)
            ours16 = to_bf16("vae", ours)
            del ours
            theirs.to(torch.bfloat16)
            theirs_enc = rel_err(theirs.encode(image.bfloat16()).latent_dist.mean, ref_mean)
            theirs_dec = rel_err(theirs.decode(z.bfloat16()).sample, ref_x)
            self.checks.check("VAE encode bf16 vs fp32", rel_err(ours16.encode(image).mean, ref_mean),
                              bf16_limit(theirs_enc), diffusers_bf16=theirs_enc)
            self.checks.check("VAE decode bf16 vs fp32", rel_err(ours16.decode(z), ref_x), bf16_limit(theirs_dec),
                              diffusers_bf16=theirs_dec)
            # PITFALL: the mid attention's single head is 512 wide, past the fused kernels' 256;
            # a user's --attention flash must fall back there, not fail.
            attention.set_backend("flash")
            try:
                x = ours16.decode(z)
            except RuntimeError as e:
                self.unavailable("VAE decode bf16 --attention flash", e)
            else:
                self.checks.check("VAE decode bf16 --attention flash vs fp32", rel_err(x, ref_x),
                                  bf16_limit(theirs_dec))
            finally:
                attention.set_backend("auto")

    # -- UNet ---------------------------------------------------------------------------------------

    def unet(self):
        d, res = self.device, self.size.image
        theirs = build_diffusers(self.size, d, torch.float32, names=("unet",))["unet"]
        ours = BUILD["unet"](FROM_DIFFUSERS["unet"](theirs.state_dict()))
        x, t, context, pooled, time_ids = unet_inputs(self.size, 2, res, d, torch.float32, seed=4)
        # two different samples: their own timestep and micro-conditioning each
        t = torch.tensor([999, 301], device=d)
        time_ids = torch.tensor([[res, res, 0, 0, res, res], [res * 3 // 4, res, 16, 32, res, res]],
                                dtype=torch.float32, device=d)
        inputs = (x, t, context, pooled, time_ids)
        bf16_inputs = tuple(v.to(torch.bfloat16) if v.is_floating_point() else v for v in inputs)
        ours.requires_grad_(False)
        # Training's path: the gradient to the conditioning (context and pooled), through our
        # autograd functions (GroupNorm, GEGLU), at half the resolution
        grad_inputs = unet_inputs(self.size, 2, res // 2, d, torch.float32, seed=7)
        probe = torch.randn(grad_inputs[0].shape, generator=torch.Generator("cpu").manual_seed(8)).to(d)
        grad_ref = conditioning_grad(functools.partial(call_diffusers_unet, theirs), grad_inputs, probe)
        self.checks.check("UNet gradient to the conditioning fp32 vs diffusers",
                          rel_err(conditioning_grad(ours, grad_inputs, probe), grad_ref), FP32_LIMIT)
        with torch.no_grad():
            ref = call_diffusers_unet(theirs, *inputs)
            self.checks.check("UNet fp32 vs diffusers", rel_err(ours(*inputs), ref), FP32_LIMIT)
            ours16 = to_bf16("unet", ours).requires_grad_(False)
            del ours
            theirs.to(torch.bfloat16)
            theirs_err = rel_err(call_diffusers_unet(theirs, *bf16_inputs), ref)
        grad16 = tuple(v.to(torch.bfloat16) if v.is_floating_point() else v for v in grad_inputs)
        theirs_grad_err = rel_err(conditioning_grad(functools.partial(call_diffusers_unet, theirs), grad16, probe), grad_ref)
        self.checks.check("UNet gradient to the conditioning bf16 vs fp32",
                          rel_err(conditioning_grad(ours16, grad16, probe), grad_ref), bf16_limit(theirs_grad_err),
                          diffusers_bf16=theirs_grad_err)
        del theirs
        with torch.no_grad():
            limit = bf16_limit(theirs_err)
            eager = ours16(*bf16_inputs)
            self.checks.check("UNet bf16 vs fp32", rel_err(eager, ref), limit, diffusers_bf16=theirs_err)
            self.each_backend("UNet", lambda: ours16(*bf16_inputs), ref, limit)
        self.compile_inputs = ours16, bf16_inputs, ref, eager, limit
        if self.device.type == "cuda":
            self.guarded("DDIM loop synchronisations", lambda: self.sync_per_step(ours16))
            self.guarded("UNet bf16 --cuda-graphs", lambda: self.cuda_graph(ours16, bf16_inputs, ref, eager, limit))
        else:
            self.checks.skip("DDIM loop synchronisations", "CUDA only")
            self.checks.skip("UNet bf16 --cuda-graphs", "CUDA only")

    def cuda_graph(self, ours16, bf16_inputs, ref, eager, limit):
        with torch.no_grad():
            graphed = CUDAGraphed(ours16)
            graphed(*bf16_inputs)  # records
            out = graphed(*bf16_inputs)
        self.checks.check("UNet bf16 --cuda-graphs vs fp32", rel_err(out, ref), limit, vs_eager=rel_err(out, eager))

    def unet_compiled(self):
        ours16, bf16_inputs, ref, eager, limit = self.compile_inputs
        del self.compile_inputs
        left = self.args.budget_s - (time.perf_counter() - self.start)
        if left < (0 if self.args.tiny else 40):
            self.checks.skip("UNet --compile regional", f"{left:.0f} s left of --budget-s {self.args.budget_s:.0f}")
            return
        compiled = speed.compile_unet(BUILD["unet"](ours16.state_dict()), "regional")
        t0 = time.perf_counter()
        with torch.no_grad():
            out = compiled(*bf16_inputs)
        self.checks.check("UNet bf16 --compile regional vs fp32", rel_err(out, ref), limit,
                          vs_eager=rel_err(out, eager), compile_and_first_call_s=time.perf_counter() - t0)

    # -- the whole pipeline ---------------------------------------------------------------------

    def whole_image(self):
        """A whole float32 image beside diffusers' StableDiffusionXLPipeline with the same weights,
        prompt and seed: tokenizers, both encoders, the UNet through DDIM with guidance, the VAE.
        Random weights amplify differences over the steps more than trained ones, so 10 steps."""
        d, px, steps = self.device, self.size.image, 10
        theirs = build_diffusers(self.size, d, torch.float32)
        sdxl = make_sdxl(ours_from_diffusers(theirs), d, torch.float32)
        with tempfile.TemporaryDirectory() as tmp:
            pipe = make_pipeline(theirs, self.size, tmp)
            out = pipe(prompt=PROMPT, num_inference_steps=steps, guidance_scale=5.0, width=px, height=px,
                       generator=torch.Generator("cpu").manual_seed(0), output_type="np")
        theirs_image = (out.images[0] * 255).round().astype(np.uint8)
        del pipe, out, theirs
        ours_image = sdxl.generate([PROMPT], [0], steps=steps, guidance=5.0, width=px, height=px)[0]
        diff = np.abs(ours_image.astype(int) - theirs_image)
        self.checks.check(f"whole {px} px image fp32 vs diffusers' pipeline, mean |pixel difference| (of 255)",
                          float(diff.mean()), 1.0, max_difference=int(diff.max()), steps=steps,
                          image_std=float(theirs_image.std()))

    def sync_per_step(self, ours16):
        """Count the synchronising CUDA calls of a 2-step and a 4-step DDIM loop: the same count
        means the step itself never waits for the device."""
        d, res = self.device, self.size.image // 4
        _, _, context, pooled, time_ids = unet_inputs(self.size, 2, res, d, torch.bfloat16, seed=5)
        x_T = torch.randn(1, 4, res // 8, res // 8, device=d)

        def eps_fn(x_t, t):
            x_in = torch.cat([x_t, x_t]).to(torch.bfloat16)
            return ours16(x_in, t.expand(2), context, pooled, time_ids).float().chunk(2)

        counts = {}
        for steps in (2, 4):
            ddim.sample(eps_fn, x_T, steps, 5.0)  # warm-up: allocator and kernel choices settle
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    ddim.sample(eps_fn, x_T, steps, 5.0)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[steps] = sum("synchroniz" in str(w.message) for w in caught)
        self.checks.check("DDIM loop synchronisations per step", (counts[4] - counts[2]) / 2, 0.0,
                          loop_total_4_steps=counts[4])

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models: checks this script on a CPU")
    p.add_argument("--budget-s", type=float, default=90, help="skip the compiled check when past this many seconds")
    out = os.environ.get("OUT")  # the device machine's output folder
    p.add_argument("--json", default=os.path.join(out, "gpu_check.json") if out else None, help="write the checks here")
    args = p.parse_args(argv)
    # float32 means float32: no TF32 in matrix products or convolutions (PyTorch's cuDNN default is TF32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    run = GPUCheck(args)
    print(f"gpu_check: {run.device_name}, torch {torch.__version__}, {run.size.name} size", flush=True)
    # the compiled UNet last: the slow check, skipped when the budget runs out
    try:
        for name, section in (("text encoders", run.text_encoders), ("VAE", run.vae), ("UNet", run.unet),
                              ("whole image", run.whole_image), ("UNet compiled", run.unet_compiled)):
            print(f"[{time.perf_counter() - run.start:6.1f} s] {name}", flush=True)
            run.guarded(name, section)
    except KeyboardInterrupt:  # gpu_run.sh's time limit: keep what was checked
        run.checks.skip("the remaining checks", "interrupted")
    failed = run.checks.summary()
    print(f"gpu_check: done in {time.perf_counter() - run.start:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
