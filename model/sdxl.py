"""The Stable Diffusion XL pipeline: prompt encoding, micro-conditioning, generation, decoding.

This file ties the components together the way SDXL base uses them:

    prompt ──tokenize──> ids ──embed──> token embeddings ──(CoCoIns: insert pseudo-words)──┐
                                                                                            │
        CLIP ViT-L/14 ── penultimate states (77×768) ───────┐                              │
        OpenCLIP bigG ── penultimate states (77×1280) ──────┴─ concat ─> context (77×2048) │
                      └─ pooled (1280) ─┐                                                   │
    (orig_h, orig_w, crop_top, crop_left, target_h, target_w) ─> time_ids ─┐  <────────────┘
                                        UNet ε̂(x_t, t, context, pooled, time_ids)
                                        DDIM (model/ddim.py) ─> latent ─> VAE decode ─> image

Loading (the official single file or a diffusers folder) is model/checkpoint.py's; speed paths
(--compile, --cuda-graphs, --offload) are model/speed.py's, which set `offload` and `graphed_unet`.

Read next: model/mapper.py (the CoCoIns part).
"""

from contextlib import nullcontext

import numpy as np
import torch

from model import checkpoint, clip, ddim, mapper, vae
from model.errors import UserError


class SDXL:
    """The four frozen SDXL models plus their tokenizers, with SDXL base's conditioning."""

    def __init__(self, tok_l, tok_g, clip_l, clip_g, unet, vae, device, dtype):
        self.tok_l, self.tok_g = tok_l, tok_g
        self.clip_l, self.clip_g = clip_l, clip_g
        self.unet, self.vae = unet, vae
        self.device, self.dtype = torch.device(device), dtype
        self.offload = None  # an Offload (--offload), set by model/speed.py
        self.graphed_unet = None  # a CUDAGraphed UNet (--cuda-graphs), set by model/speed.py

    # -- loading --------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str, device="cpu", dtype=torch.float32, vae_path: str | None = None):
        """Load SDXL from the official single file or a diffusers folder (model/checkpoint.py)."""
        m = checkpoint.load_sdxl(path, device, dtype, vae_path)
        return cls(m["tok_l"], m["tok_g"], m["clip_l"], m["clip_g"], m["unet"], m["vae"], device, dtype)

    # -- conditioning ---------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], subjects=None):
        """Prompts -> (context (B, 77, 2048), pooled (B, 1280)) as SDXL base computes them.

        `subjects` (CoCoIns) is a list of (w_l, w_g, concept) triples: pseudo-words for the two
        encoders ((D,) for every prompt or (B, D) one per prompt) and the concept word they are
        inserted before (one word, or a list of one word per prompt)."""
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
    def time_ids(height, width, batch, device):
        """SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w), float32.

        At sampling time the 'original size' is the target size and the crop is (0, 0): the
        image the model was told is an uncropped photo of exactly that size."""
        # PITFALL: always float32, whatever the model's dtype: bfloat16 keeps 8 significant bits,
        # so sizes like 1023 or 2056 would round (to 1024, 2048) and condition on another size.
        ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32, device=device)
        return ids.expand(batch, 6)

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
        time_ids = self.time_ids(height, width, 2, self.device)
        # The batch is [conditional, unconditional]: the UNet sees both halves in one pass. At
        # guidance 1, ε̂ = ε_c: the unconditional half is never read, so never computed.
        n = 1 if guidance == 1 else 2
        cond = (torch.cat([context, neg_context])[:n].to(self.dtype), torch.cat([pooled, neg_pooled])[:n].to(self.dtype),
                time_ids[:n].contiguous())
        unet_step = self.graphed_unet or self.unet

        # (inputs contiguous, as bench.py's: a compiled UNet's guards include strides)
        def eps_fn(x_t, t):
            eps = unet_step(x_t.repeat(n, 1, 1, 1).to(self.dtype), t.repeat(n), *cond).float()
            return eps.chunk(2) if n == 2 else (eps, None)

        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (1, 4, height // 8, width // 8)
        x_T = ddim.randn(shape, generator, self.device, torch.float32)
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
