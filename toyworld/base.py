"""A small SDXL trained from scratch on the toy world: the VAE first, then the UNet on its latents.

Everything is the project's own model code (model/), at toy widths, and the result is saved as
an official-layout single file that `sample.py`, `train.py` and `eval.py` load with `--weights`:

    VAE     SDXL's AutoencoderKL with 4 levels (8x downsampling, 4 latent channels), 64 channels wide.
            64 px images -> 4 x 8 x 8 latents, trained on L1 reconstruction of the posterior mean.
    text    CLIP-L (64 wide) and bigG (128 wide, pooled 32), 3 layers each, with the real CLIP
            tokenizer; TRAINED jointly with the UNet, their token tables frozen at CLIP's random
            initialisation. Why trained: SDXL's encoders come from CLIP, trained on captions, and
            keep words apart; a random frozen causal transformer mixes every token into the later
            ones, so an inserted word rewrites the scene words' features (a pseudo-word moved them
            by 0.57 of their norm, more than swapping the scene phrase did), and the mapper bought
            distinct people by rewriting the prompt (toyworld/RESULTS-frozen-text.md). Trained here,
            on captions that name attributes before the concept word only some of the time, the
            encoders learn to carry the scene past whatever comes before it. Why the token tables
            stay frozen: the mapper shapes pseudo-words by the token table's per-dimension mean and
            std (model/mapper.py), which in SDXL describe trained words; here ~100 of 49,408 rows
            are used, and training only those would leave the table's statistics describing
            untouched noise. `BaseConfig.text = "frozen"` gives the earlier, random frozen encoders.
    UNet    SDXL's topology: 3 levels (64, 64, 128 channels), attention at every level (below),
            cross-attention to the 192-wide context, added size/crop conditioning; ε-prediction
            on SDXL's schedule (model/ddim.py), 10 % caption dropout to the zero conditioning
            that an empty negative prompt gives (so classifier-free guidance works as in SDXL).

PITFALL: the pipeline scales latents by SDXL's 0.13025 (model/vae.py SCALING_FACTOR). A VAE trained
from scratch has its own latent spread, so after training the latent is rescaled inside the VAE
(the encoder's quant_conv and the decoder's post_quant_conv, an exact change of variables) until
0.13025 · z has unit standard deviation, as SDXL's VAE was scaled for its latents.

Read next: toyworld/judge.py (the classifier that reads people from images).
"""

import json
import os
import random
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from model import ddim
from model.clip import CLIPTextConfig, CLIPTextModel, OpenCLIPTextConfig, OpenCLIPTextModel, Tokenizer, eos_positions
from model.checkpoint import PREFIX
from model.unet import UNet, UNetConfig
from model.vae import SCALING_FACTOR, AutoencoderKL, VAEConfig
from toyworld import world

CLIP_L = CLIPTextConfig(width=64, layers=3, heads=1, mlp_width=256)
CLIP_G = OpenCLIPTextConfig(width=128, layers=3, heads=2, mlp_width=512, projection_dim=32)
# PITFALL: GroupNorm has 32 groups in every SDXL model (the loader assumes it: the weights do not
# store it). At 32 channels that is one channel per group, an instance norm that erases each
# channel's mean, and with it the flat colours this world is made of. So no layer is under 64 wide.
VAE = VAEConfig(ch=32, ch_mult=(2, 2, 2, 2), num_res_blocks=1)
# Unlike SDXL, the first level attends too: at 64 px it is the 8x8 latent, the only level where a
# person is more than one pixel wide, so the words reach the places where attributes are drawn.
UNET = UNetConfig(model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1, transformer_depth=(1, 1, 1),
                  transformer_depth_middle=1, context_dim=CLIP_L.width + CLIP_G.width,
                  adm_in_channels=CLIP_G.projection_dim + 6 * 256)


@dataclass
class BaseConfig:
    vae_steps: int = 1000  # VAE steps on whole 64 px images
    vae_batch: int = 6
    vae_lr: float = 2e-3
    latent_penalty: float = 1e-4  # weight of mean(μ²): keeps the latent's scale from drifting
    unet_steps: int = 2400  # UNet steps; ~26 epochs of a 6,000-image world at batch 64
    unet_batch: int = 64
    unet_lr: float = 6e-4
    ema: float = 0.999  # the saved UNet is an exponential moving average of the trained one
    caption_dropout: float = 0.1  # share of steps' captions replaced by the unconditional zeros
    text: str = "trained"  # the CLIP towers: "trained" with the UNet (token tables frozen), or "frozen"
    # The people's names (world.WorldConfig.named): "learned", their rows of both token tables train with the
    # towers, as CLIP learned the tokens of the famous names SDXL knows; "frozen", at CLIP's random initialisation
    # like every other row. Frozen, 190 captions per name taught the towers nothing: a named prompt drew what the
    # unnamed one did. A few learned rows (16) of 49,408 leave the tables' statistics, which shape the pseudo-words, as
    # they were.
    names: str = "learned"
    model_channels: int = 64  # the UNet's width (UNET's); another width is another base model of the same world
    seed: int = 0

    def vae_part(self) -> dict:
        """The settings the VAE depends on (a changed UNet setting keeps the trained VAE)."""
        return {k: getattr(self, k) for k in ("vae_steps", "vae_batch", "vae_lr", "latent_penalty", "seed")}


def _init_text(model: torch.nn.Module, generator: torch.Generator) -> None:
    """CLIP's initialisation: tokens N(0, 0.02²), positions N(0, 0.01²), Linear layers PyTorch's default."""
    for name, p in model.named_parameters():
        if "token_embedding" in name:
            torch.nn.init.normal_(p, std=0.02, generator=generator)
        elif "position" in name:
            torch.nn.init.normal_(p, std=0.01, generator=generator)
        elif name.endswith("text_projection"):
            torch.nn.init.normal_(p, std=p.shape[0] ** -0.5, generator=generator)
        elif name.endswith("in_proj_weight"):  # bigG's fused q|k|v (nn.MultiheadAttention's init)
            torch.nn.init.xavier_uniform_(p, generator=generator)
        elif name.endswith("in_proj_bias"):
            torch.nn.init.zeros_(p)


def build(seed: int = 0, model_channels: int = UNET.model_channels) -> dict[str, torch.nn.Module]:
    """The four toy SDXL models, freshly initialised (the UNet `model_channels` wide)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    unet = UNet(replace(UNET, model_channels=model_channels))
    models = {"clip_l": CLIPTextModel(CLIP_L), "clip_g": OpenCLIPTextModel(CLIP_G), "unet": unet,
              "vae": AutoencoderKL(VAE)}
    for name in ("clip_l", "clip_g"):
        _init_text(models[name], g)
    # The UNet's last conv starts at zero: ε̂ = 0 at first, no random pull on the early steps.
    torch.nn.init.zeros_(models["unet"].out[-1].weight)
    torch.nn.init.zeros_(models["unet"].out[-1].bias)
    return models


def save_single_file(path: str, models: dict[str, torch.nn.Module]) -> None:
    """Write the four models under the official SDXL prefixes (the layout of sd_xl_base_1.0.safetensors)."""
    sd = {PREFIX[name] + k: v.detach().contiguous() for name, m in models.items() for k, v in m.state_dict().items()}
    tmp = path + ".tmp"
    save_file(sd, tmp, metadata={"toyworld": "trained from scratch on toyworld/world.py"})
    os.replace(tmp, path)


# -- the world as tensors ------------------------------------------------------------------------


def load_world_truth(folder: str) -> list[dict]:
    """The truth of every image of an exported world (its person, scene, pose, name, time_ids, placement), in
    file order."""
    with open(os.path.join(folder, "truth.json")) as f:
        truth = json.load(f)
    return [truth[n] for n in sorted(truth)]


def load_world(folder: str, masks: bool = False):
    """(images (N, 3, 64, 64) uint8, names, truth dicts[, masks (N, 1, 64, 64) float 0/1]) of an exported world."""
    with open(os.path.join(folder, "truth.json")) as f:
        truth = json.load(f)
    names = sorted(truth)
    images = np.stack([np.asarray(Image.open(os.path.join(folder, "img_align_celeba", n)).convert("RGB"))
                       for n in names])
    out = (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), names, [truth[n] for n in names])
    if masks:
        m = np.stack([np.asarray(Image.open(os.path.join(folder, "masks", n))) > 0 for n in names])
        out += (torch.from_numpy(m).float()[:, None],)
    return out


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return images.float() / 127.5 - 1


# -- the VAE -------------------------------------------------------------------------------------


def train_vae(vae: AutoencoderKL, images: torch.Tensor, masks: torch.Tensor, cfg: BaseConfig, log=print) -> None:
    """L = mean(w ⊙ |x − D(μ(x))|) + c·mean(μ²),  w = 1 + 4·m: trained as an autoencoder on the posterior mean.

    Everything downstream uses the mode μ (train.py encodes with it, the UNet draws it), so the
    sampled z = μ + σ·ε of a full VAE would only slow training: with a whisper of KL, as Stable
    Diffusion's, the encoder first has to learn to silence σ before the decoder sees anything.
    The person is a sixth of the pixels and the only part with many colours; without the weight w
    (5 on the subject mask m) a short run learns the scenery and leaves the people a smudge.
    The small penalty on μ² keeps the latent's scale from drifting (it is folded out afterwards)."""
    rng = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    vae.train()
    t0, avg = time.time(), None
    for step in range(1, cfg.vae_steps + 1):
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=rng)
        x, w = to_unit(images[idx]), 1 + 4 * masks[idx]
        mu = vae.encode(x).mode()
        err = (vae.decode(mu) - x).abs()
        loss = (w * err).mean() + cfg.latent_penalty * mu.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        l1 = err.mean().item()
        avg = l1 if avg is None else 0.95 * avg + 0.05 * l1
        if step % 100 == 0 or step == cfg.vae_steps:
            log(f"vae step {step}/{cfg.vae_steps}  L1 {avg:.4f}  {time.time() - t0:.0f}s")
    vae.eval()


@torch.no_grad()
def encode_means(vae: AutoencoderKL, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Unscaled latent means z (N, 4, 8, 8), the mode of q(z|x), as train.py encodes."""
    return torch.cat([vae.encode(to_unit(images[i : i + batch])).mode() for i in range(0, len(images), batch)])


@torch.no_grad()
def fold_latent_scale(vae: AutoencoderKL, z: torch.Tensor) -> float:
    """Rescale the VAE's latent so that SCALING_FACTOR · z has unit std; returns the factor applied.

    z' = s·z: the encoder's mean channels of quant_conv are multiplied by s (and its log-variance
    channels shifted by 2·log s), the decoder's post_quant_conv divides its input weights by s, so
    D(z') = D(z) exactly and the UNet's latents SCALING_FACTOR · z' are standardised."""
    s = 1.0 / (SCALING_FACTOR * z.std().item())
    C = vae.config.z_channels
    vae.quant_conv.weight[:C] *= s
    vae.quant_conv.bias[:C] *= s
    vae.quant_conv.bias[C:] += 2 * np.log(s)
    vae.post_quant_conv.weight /= s
    return s


# -- the UNet ------------------------------------------------------------------------------------


class TextEncoder(torch.nn.Module):
    """Prompts -> (context (B, 77, 192), pooled (B, 32)) with the toy CLIP towers, as SDXL encodes.

    `train`: the towers learn with the UNet, all but their token tables (see the module's docstring);
    `learned_tokens`: the ids whose rows of both token tables learn too (the people's names)."""

    def __init__(self, clip_l: CLIPTextModel, clip_g: OpenCLIPTextModel, train: bool = False,
                 learned_tokens: tuple[int, ...] = ()):
        super().__init__()
        self.clip_l, self.clip_g = clip_l, clip_g
        self.requires_grad_(train)
        for table in (clip_l.text_model.embeddings.token_embedding.weight, clip_g.token_embedding.weight):
            table.requires_grad_(train and bool(learned_tokens))
            if train and learned_tokens:
                # Only these rows learn: the gradient of every other row is zero, and AdamW without weight
                # decay leaves a row whose gradient is always zero exactly as it was.
                rows = torch.zeros(table.shape[0], 1)
                rows[list(learned_tokens)] = 1.0
                table.register_hook(lambda grad, rows=rows: grad * rows)
        self.train(train)
        self.tok_l, self.tok_g = Tokenizer.bundled(pad="eos"), Tokenizer.bundled(pad="!")

    def forward(self, prompts: list[str]):
        ids_l, ids_g = self.tok_l(prompts), self.tok_g(prompts)
        out_l = self.clip_l(self.clip_l.embed(ids_l), eos_positions(ids_l))
        out_g = self.clip_g(self.clip_g.embed(ids_g), eos_positions(ids_g))
        return torch.cat([out_l.penultimate, out_g.penultimate], dim=-1), out_g.pooled


def fresh_captions(truth: list[dict], rng: random.Random, name_rate: float = 0.0) -> list[str]:
    """A new caption per image each step (the world's captioner, a new draw of what it names; a named person
    called by name `name_rate` of the time)."""
    out = []
    for t in truth:
        who = world.Identity(*(world.FACTORS[f].index(t[f]) for f in world.FACTORS))
        at = world.Placement(world.SCENES.index(t["scene"]), world.POSES.index(t["pose"]), 0, 0, 0, 0, 0)
        concept = "person" if rng.random() < 0.2 else t["gender"]
        out.append(world.caption(concept, who, at, rng, t.get("name"), name_rate))
    return out


def size_conditioning(truth: list[dict]) -> torch.Tensor:
    """(N, 6) float32 time_ids (orig_h, orig_w, crop_top, crop_left, 64, 64) of each image: its own original size
    and crop where the world recorded one (SDXL's micro-conditioning), else a 64 px square original."""
    square = [world.SIZE, world.SIZE, 0, 0, world.SIZE, world.SIZE]
    return torch.tensor([t.get("time_ids", square) for t in truth], dtype=torch.float32)


def train_unet(unet: UNet, text: TextEncoder, latents: torch.Tensor, truth: list[dict], cfg: BaseConfig, log=print,
               name_rate: float = 0.0) -> None:
    """ε-prediction on SDXL's schedule: L = ‖ε − ε_θ(√ᾱ_t·x₀ + √(1−ᾱ_t)·ε, t, c, y)‖², c and y from
    `text` (trained with the UNet when its parameters require gradients). On return `unet` and
    `text` hold the exponential moving average of their weights, in eval mode."""
    rng, g = random.Random(cfg.seed), torch.Generator().manual_seed(cfg.seed)
    alpha_bar = ddim.alpha_bars()
    trained = torch.nn.ModuleDict({"unet": unet, "text": text})
    params = [p for p in trained.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    B = cfg.unet_batch
    all_time_ids = size_conditioning(truth)
    unet.train()
    t0, avg = time.time(), None
    for step in range(1, cfg.unet_steps + 1):
        idx = torch.randint(len(latents), (B,), generator=g)
        context, pooled = text(fresh_captions([truth[i] for i in idx.tolist()], rng, name_rate))
        # Caption dropout: the unconditional branch of SDXL base is all zeros (empty negative prompt).
        keep = (torch.rand(B, generator=g) >= cfg.caption_dropout).float()
        context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        x0 = latents[idx]
        t = torch.randint(0, ddim.T, (B,), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        x_t = ddim.add_noise(x0, eps, alpha_bar[t])
        loss = F.mse_loss(unet(x_t, t, context, pooled, all_time_ids[idx]), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            # EMA warm-up: a short run cannot wait for 1/(1 − 0.999) steps before the average means anything.
            decay = min(cfg.ema, (1 + step) / (10 + step))
            for p_ema, p in zip(ema, params):
                p_ema.lerp_(p, 1 - decay)
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0 or step == cfg.unet_steps:
            log(f"unet step {step}/{cfg.unet_steps}  loss {avg:.4f}  {time.time() - t0:.0f}s")
    with torch.no_grad():
        for p_ema, p in zip(ema, params):
            p.copy_(p_ema)
    trained.eval().requires_grad_(False)


def make_vae(world_dir: str, cfg: BaseConfig = BaseConfig(), log=print,
             figure: str | None = None) -> tuple[AutoencoderKL, dict]:
    """World -> trained VAE with its latent scale folded in. Returns (vae, training facts).

    `figure`: a PNG of 8 images (top) and their VAE reconstructions (bottom)."""
    torch.manual_seed(cfg.seed)
    images, _, _, masks = load_world(world_dir, masks=True)
    vae = build(cfg.seed)["vae"]
    t0 = time.time()
    train_vae(vae, images, masks, cfg, log)
    z = encode_means(vae, images)
    s = fold_latent_scale(vae, z)
    log(f"latent scale folded into the VAE: x{s:.3f}")
    with torch.no_grad():
        rec = vae.decode(z[:256] * s).clamp(-1, 1)
    if figure:
        pairs = torch.stack([images[:8], ((rec[:8] + 1) * 127.5).round().byte()])  # (2, 8, 3, 64, 64)
        Image.fromarray(pairs.permute(0, 3, 1, 4, 2).reshape(2 * 64, 8 * 64, 3).numpy()).save(figure)
    return vae, {"vae_seconds": round(time.time() - t0), "latent_scale": s,
                 "vae_l1_64px": round((rec - to_unit(images[:256])).abs().mean().item(), 4)}


def train_base(world_dir: str, out_path: str, vae: AutoencoderKL, cfg: BaseConfig = BaseConfig(), log=print,
               name_rate: float = 0.0) -> dict:
    """World + trained VAE (`make_vae`) -> latents -> UNet and text encoders -> `out_path` (official
    single file). Returns training facts."""
    if cfg.text not in ("trained", "frozen"):
        raise ValueError(f'BaseConfig.text must be "trained" or "frozen", got {cfg.text!r}')
    images, _, truth = load_world(world_dir)
    models = build(cfg.seed, cfg.model_channels)
    models["vae"] = vae.eval()
    t0 = time.time()
    latents = encode_means(vae, images) * SCALING_FACTOR
    log(f"latents: mean {latents.mean():.3f}, std {latents.std():.3f}")
    names = sorted({t["name"] for t in truth if t.get("name")})
    # A name's row learns with the encoders when cfg.names says so (one token each: world.name_tokens).
    learned = tuple(Tokenizer.bundled(pad="eos").encode(n)[0] for n in names) if cfg.names == "learned" else ()
    text = TextEncoder(models["clip_l"], models["clip_g"], train=cfg.text == "trained", learned_tokens=learned)
    train_unet(models["unet"], text, latents, truth, cfg, log, name_rate)
    save_single_file(out_path, models)
    return {"unet_seconds": round(time.time() - t0), "text": cfg.text, "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "parameters": {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}}
