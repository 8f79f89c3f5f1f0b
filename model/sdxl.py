"""One checkpoint -> a ready Stable Diffusion XL: loading, prompt encoding, generation.

This file ties the components together the way SDXL base uses them:

    prompt ──tokenize──> ids ──embed──> token embeddings ──(CoCoIns: insert pseudo-words)──┐
                                                                                            │
        CLIP ViT-L/14 ── penultimate states (77×768) ───────┐                              │
        OpenCLIP bigG ── penultimate states (77×1280) ──────┴─ concat ─> context (77×2048) │
                      └─ pooled (1280) ─┐                                                   │
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w) ─> time_ids ─┐  <────────────┘
                                        UNet ε̂(x_t, t, context, pooled, time_ids)
                                        DDIM (model/ddim.py) ─> latent ─> VAE decode ─> image

Loading accepts the two layouts people have on disk:
  * the official single file `sd_xl_base_1.0.safetensors` (and SDXL fine-tunes saved the same
    way): four key prefixes, one per model;
  * a diffusers folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`, `tokenizer*/`),
    with or without `.fp16` variant files; each model file converts it to official names.
Every tensor is accounted for (strict loading), tensors stream one by one to the target device
and dtype, and anything that is not SDXL base ends in one sentence saying what it looks like.

Read next: model/mapper.py (the CoCoIns part), then sample.py.
"""

from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from model import checkpoint, clip, ddim, unet, vae
from model.errors import UserError

# ----------------------------------------------------------------------------------------------
# Offloading (--offload): the models wait in host memory and visit the GPU one at a time
# ----------------------------------------------------------------------------------------------

class Offload:
    """Keeps models in host memory and lends each to `device` only while it runs.

    SDXL's four models hold 6.9 GB in bfloat16, but an image needs them one after another
    (text encoders, then the UNet at every step, then the VAE), so a GPU that holds the UNet
    and its activations is enough. Lending copies a model's tensors to the device (always a
    copy, on a CPU too: the host tensors are never the ones computed with); giving it back
    points the parameters at their host copies again. The models are frozen, so nothing is
    ever copied back. On CUDA the host copies are pinned (page-locked): the copies then run at
    full PCIe speed, with no staging buffer."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.lent = {}  # model -> number of open `lend` blocks holding it (tests read this)

    @staticmethod
    def _tensors(model):
        return [*model.parameters(), *model.buffers()]

    def store(self, model):
        """Move `model` to host memory, where it waits between lends."""
        pin = self.device.type == "cuda"
        for t in self._tensors(model):
            t.data = t.data.cpu().pin_memory() if pin else t.data.cpu()

    @contextmanager
    def lend(self, *models):
        """Run the block with `models` on the device; a model lent by an outer block moves once."""
        arriving = [m for m in dict.fromkeys(models) if m not in self.lent]
        host = {m: [t.data for t in self._tensors(m)] for m in arriving}
        for m in models:
            self.lent[m] = self.lent.get(m, 0) + 1
        try:
            for m in arriving:
                for t in self._tensors(m):
                    t.data = t.data.to(self.device, non_blocking=True, copy=True)
            yield
        finally:
            for m in models:
                self.lent[m] -= 1
            for m in arriving:
                for t, on_host in zip(self._tensors(m), host[m]):
                    t.data = on_host
                del self.lent[m]


# ----------------------------------------------------------------------------------------------
# CUDA graphs (--cuda-graphs): a UNet step replayed from one recording
# ----------------------------------------------------------------------------------------------

def check_cuda_graphs(device, offload: bool) -> None:
    """--cuda-graphs' requirements, as one sentence each."""
    if torch.device(device).type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA GPU, and this run is on {torch.device(device).type}; drop the flag")
    if offload:
        raise UserError("--cuda-graphs and --offload cannot be combined: a CUDA graph keeps the addresses of the "
                        "weights it recorded, and offloading moves them; choose one")


class CUDAGraphed:
    """Calls `module` by replaying a CUDA graph of one call instead of launching its kernels.

    A UNet step launches a few thousand kernels, each costing the CPU microseconds of Python and
    driver work; when that adds up to more than the GPU's work, the GPU waits. A CUDA graph
    records the launches of one call and replays them all with one. The recording fixes every
    address, so inputs are copied into the recorded input buffers before each replay and the
    output is copied out of the recorded one after it (the next replay overwrites it). Each
    input shape (image size, batch) is recorded once, on its first call.

    For inference only (calls with autograd on go straight to the module), with the weights
    staying where they are (not with Offload, which moves them)."""

    def __init__(self, module):
        self.module = module
        self.graphs = {}  # input shapes and dtypes -> (graph, input buffers, output buffer)

    def __call__(self, *inputs):
        if torch.is_grad_enabled():
            return self.module(*inputs)
        key = tuple((x.shape, x.dtype) for x in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._record(inputs)
        graph, buffers, output = self.graphs[key]
        # (on the inputs' GPU, which need not be the current one: --device cuda:1)
        with torch.cuda.device(inputs[0].device):
            for buffer, x in zip(buffers, inputs):
                buffer.copy_(x)
            graph.replay()
            return output.clone()

    def _record(self, inputs):
        with torch.cuda.device(inputs[0].device):  # streams and the recording on the inputs' GPU
            return self._record_here(inputs)

    def _record_here(self, inputs):
        buffers = [x.clone(memory_format=torch.contiguous_format) for x in inputs]
        # Warm-up on a side stream (PyTorch's recipe): lazy initialisation (cuBLAS handles,
        # torch.compile's compilation, the allocator's first blocks) must not be recorded.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.module(*buffers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.module(*buffers)
        return graph, buffers, output


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class SDXL:
    """The four frozen SDXL models plus their tokenizers, with SDXL base's conditioning."""

    def __init__(self, tok_l, tok_g, clip_l, clip_g, unet, vae, device, dtype):
        self.tok_l, self.tok_g = tok_l, tok_g
        self.clip_l, self.clip_g = clip_l, clip_g
        self.unet, self.vae = unet, vae
        self.device, self.dtype = torch.device(device), dtype
        self.offload = None  # an Offload once enable_offload() is called (--offload)
        self.graphed_unet = None  # a CUDAGraphed UNet once enable_cuda_graphs() is called (--cuda-graphs)

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str, device="cpu", dtype=torch.float32, vae_path: str | None = None):
        """Load SDXL from the official single file or a diffusers folder (see module docstring)."""
        m = checkpoint.load_sdxl(path, device, dtype, vae_path)
        return cls(m["tok_l"], m["tok_g"], m["clip_l"], m["clip_g"], m["unet"], m["vae"], device, dtype)

    # -- conditioning ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], subjects=None):
        """Prompts -> (context (B, 77, 2048), pooled (B, 1280)) as SDXL base computes them.

        `subjects` (CoCoIns) is a list of (w_l, w_g, concept) triples: pseudo-words for the two
        encoders ((D,) for every prompt or (B, D) one per prompt) and the concept word they are
        inserted before (one word, or a list of one word per prompt)."""
        from model import mapper  # CoCoIns lives in its own chapter

        # ids stay on the CPU, where insertion looks up the concept positions without a device sync.
        ids_l, ids_g = self.tok_l(prompts), self.tok_g(prompts)
        e_l, e_g = self.clip_l.embed(ids_l.to(self.device)), self.clip_g.embed(ids_g.to(self.device))
        eos_l, eos_g = clip.eos_positions(ids_l).to(self.device), clip.eos_positions(ids_g).to(self.device)
        if subjects:
            e_l, eos_l = mapper.insert_subjects(e_l, eos_l, ids_l, self.tok_l, [(w_l, c) for w_l, _, c in subjects], prompts)
            e_g, eos_g = mapper.insert_subjects(e_g, eos_g, ids_g, self.tok_g, [(w_g, c) for _, w_g, c in subjects], prompts)
        out_l = self.clip_l(e_l, eos_l)
        out_g = self.clip_g(e_g, eos_g)
        # PITFALL: both encoders contribute their *penultimate* layer; the context is their concat.
        context = torch.cat([out_l.penultimate, out_g.penultimate], dim=-1)
        return context, out_g.pooled

    def encode_negative(self, negative_prompt: str, batch: int, like_context, like_pooled):
        # PITFALL: SDXL base conditions the unconditional branch of an *empty* negative prompt on
        # zeros (context and pooled), not on the encoding of "" (diffusers: force_zeros_for_empty_prompt).
        if not negative_prompt:
            return torch.zeros_like(like_context), torch.zeros_like(like_pooled)
        return self.encode_prompt([negative_prompt] * batch)

    @staticmethod
    def time_ids(height, width, batch, device, original=None, crop=(0, 0)):
        """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w), float32.

        At sampling time the 'original size' is the target size and the crop is (0, 0): the
        image the model was told is an uncropped photo of exactly that size."""
        orig_h, orig_w = original or (height, width)
        # PITFALL: always float32, whatever the model's dtype: bfloat16 keeps 8 significant bits,
        # so sizes like 1023 or 2056 would round (to 1024, 2048) and condition on another size.
        ids = torch.tensor([orig_h, orig_w, crop[0], crop[1], height, width], dtype=torch.float32, device=device)
        return ids.expand(batch, 6)

    # -- speed: --compile, --offload -------------------------------------------------------------

    def compile(self, mode: str = "regional"):
        """--compile: torch.compile the UNet (see unet.compile_unet); `full` also compiles the
        VAE decoder (one graph; 64 -> 36 ms per 1024 px decode on one H200, 31 s to compile)."""
        unet.compile_unet(self.unet, mode)
        if mode == "full":
            self.vae.decoder.compile(dynamic=False, fullgraph=True)

    def enable_cuda_graphs(self):
        """--cuda-graphs: generate() replays a CUDA graph of the UNet step (see CUDAGraphed)."""
        check_cuda_graphs(self.device, offload=self.offload is not None)
        self.graphed_unet = CUDAGraphed(self.unet)

    def enable_offload(self, device):
        """--offload: keep the models in host memory and lend each to `device` only while it runs."""
        if self.graphed_unet:
            check_cuda_graphs(device, offload=True)
        self.device = torch.device(device)
        self.offload = Offload(self.device)
        for model in (self.clip_l, self.clip_g, self.unet, self.vae):
            self.offload.store(model)

    def on_device(self, *models):
        """A block in which `models` are on self.device (they always are, unless offloading)."""
        return self.offload.lend(*models) if self.offload else nullcontext()

    # -- generation -----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt: str, seed: int, negative_prompt="", steps=30, guidance=5.0, eta=0.0,
                 width=1024, height=1024, subjects=None, progress=False) -> np.ndarray:
        """One image (H, W, 3) uint8 for one prompt and one seed, DDIM with classifier-free guidance."""
        with self.on_device(self.clip_l, self.clip_g):
            context, pooled = self.encode_prompt([prompt], subjects)
            # (at guidance 1 the unconditional half is never computed: no need to encode it)
            neg_context, neg_pooled = self.encode_negative(negative_prompt if guidance != 1 else "", 1, context, pooled)
        time_ids = self.time_ids(height, width, 1, self.device)
        # The batch is [conditional, unconditional]; the UNet sees both halves in one pass.
        cond = dict(context=torch.cat([context, neg_context]).to(self.dtype),
                    pooled=torch.cat([pooled, neg_pooled]).to(self.dtype),
                    time_ids=torch.cat([time_ids, time_ids]))

        unet_step = self.graphed_unet or self.unet
        if guidance == 1:  # ε̂ = ε_c: the unconditional half is never read, so never computed
            cond = {k: v[:1] for k, v in cond.items()}

        # (inputs contiguous, as bench.py's: a compiled UNet's guards include strides)
        def eps_fn(x_t, t):
            if guidance == 1:
                return unet_step(x_t.to(self.dtype), t.repeat(1), cond["context"], cond["pooled"],
                                 cond["time_ids"]).float(), None
            x_in = torch.cat([x_t, x_t]).to(self.dtype)
            eps_c, eps_u = unet_step(x_in, t.repeat(2), cond["context"], cond["pooled"],
                                     cond["time_ids"]).float().chunk(2)
            return eps_c, eps_u

        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (1, 4, height // 8, width // 8)
        x_T = ddim.initial_noise(generator, shape, self.device, torch.float32)
        with self.on_device(self.unet):
            x_0 = ddim.sample(eps_fn, x_T, steps, guidance, eta, generator, progress=progress)
        with self.on_device(self.vae):
            return self.decode(x_0)[0]

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """UNet latents -> uint8 images (B, H, W, 3)."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode((latents / vae.SCALING_FACTOR).to(vae_dtype)).float()
        # [-1, 1] -> [0, 255], rounded as diffusers' image processor rounds.
        x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()


def check_size(width: int, height: int) -> None:
    if width % 8 or height % 8 or width <= 0 or height <= 0:
        raise UserError(f"--width {width} --height {height}: both must be positive multiples of 8 (the VAE downsamples by 8), e.g. 1024")
