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
    def generate(self, prompts: list[str], seeds: list[int], subjects=None, negative_prompt: str = "",
                 steps: int = 30, guidance: float = 5.0, eta: float = 0.0, width: int = 1024, height: int = 1024,
                 batch_size: int | None = None, progress: bool = False) -> np.ndarray:
        """Images (N, H, W, 3) uint8, prompts[i] drawn from seeds[i], DDIM with classifier-free guidance.

        `subjects` as encode_prompt takes them, pseudo-words (D,) for every image or (N, D) one each;
        `batch_size` images share a UNet batch (None: all N). Each image draws x_T and its η-noise
        from its own generator: it is the image it would be alone (bit for bit at batch_size 1)."""
        if len(seeds) != len(prompts):
            raise ValueError(f"one seed per prompt: {len(prompts)} prompts, {len(seeds)} seeds")
        if batch_size and len(prompts) > batch_size:  # a batch at a time, each with its images' pseudo-words
            rows = [slice(k, k + batch_size) for k in range(0, len(prompts), batch_size)]
            return np.concatenate([self.generate(prompts[r], seeds[r], _rows(subjects, r), negative_prompt, steps,
                                                 guidance, eta, width, height, None, progress) for r in rows])
        # The UNet sees [conditional; unconditional] in one pass. At guidance 1, ε̂ = ε_c: the
        # unconditional half is never read, so never computed (nor its negative prompt encoded).
        B, n = len(prompts), 1 if guidance == 1 else 2
        with self.on_device(self.clip_l, self.clip_g):
            context, pooled = self.encode_prompt(prompts, subjects)
            neg_context, neg_pooled = self.encode_negative(negative_prompt if n == 2 else "", B, context, pooled)
        cond = (torch.cat([context, neg_context])[: n * B].to(self.dtype),
                torch.cat([pooled, neg_pooled])[: n * B].to(self.dtype),
                self.time_ids(height, width, n * B, self.device).contiguous())
        unet_step = self.graphed_unet or self.unet  # (a CUDA graph is recorded once per batch shape)

        # (inputs contiguous, as bench.py's: a compiled UNet's guards include strides)
        def eps_fn(x_t, t):
            eps = unet_step(x_t.repeat(n, 1, 1, 1).to(self.dtype), t.repeat(n), *cond).float()
            return eps.chunk(2) if n == 2 else (eps, None)

        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]  # ddim.randn: a row each
        x_T = ddim.randn((B, 4, height // 8, width // 8), generators, self.device, torch.float32)
        with self.on_device(self.unet):
            x_0 = ddim.sample(eps_fn, x_T, steps, guidance, eta, generators, progress=progress)
        with self.on_device(self.vae):
            return self.decode(x_0)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """UNet latents -> uint8 images (B, H, W, 3)."""
        vae_dtype = next(self.vae.parameters()).dtype
        x = self.vae.decode((latents / vae.SCALING_FACTOR).to(vae_dtype)).float()
        # [-1, 1] -> [0, 255], rounded as diffusers' image processor rounds.
        x = ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()


def _rows(subjects, rows: slice):
    """The subjects of images `rows`: per-image pseudo-words (N, D) and concept lists cut to them."""
    return subjects and [(w_l if w_l.ndim == 1 else w_l[rows], w_g if w_g.ndim == 1 else w_g[rows],
                          concept if isinstance(concept, str) else concept[rows]) for w_l, w_g, concept in subjects]
