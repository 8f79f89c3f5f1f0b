"""The SDXL UNet: the denoiser ε_θ(x_t, e, t) of the paper (section 3), frozen during training.

It predicts the noise ε̂ in a noisy latent x_t from three things, which enter at different places:

    t          the timestep      -> sinusoid -> MLP -> emb, added inside every ResBlock
    y          added conditioning (pooled bigG text vector ++ sinusoids of the image size and
               crop, SDXL's "micro-conditioning") -> MLP -> added to emb
    context    the token embeddings of both text encoders (77 × 2048), read by the
               cross-attention of every transformer block (this is where CoCoIns' pseudo-words
               reach the image)

The network is a U: three levels of 320/640/1280 channels going down (input_blocks), a middle
block, and the same levels going up (output_blocks), where each up block first concatenates the
output of its mirror-image down block (the skip connections). Levels 2 and 3 hold
SpatialTransformers with 2 and 10 transformer blocks; every attention head is 64 wide.

Reference: Stability AI's `sgm` (generative-models), `sgm/modules/diffusionmodules/openaimodel.py`
(UNetModel, ResBlock, Downsample, Upsample) and `sgm/modules/attention.py` (SpatialTransformer,
BasicTransformerBlock, CrossAttention, GEGLU); SDXL config `configs/inference/sd_xl_base.yaml`.
Module attribute names equal the official checkpoint's `model.diffusion_model.*` names, so the
official file loads by prefix with `strict=True` (model/checkpoint.py renames the diffusers
layout, `unet/diffusion_pytorch_model.safetensors`, to the same names).

Symbols:   x_t noisy latent (B, 4, h, w)   t timestep (B,)   eps ε̂ predicted noise
           context (B, 77, 2048)   pooled (B, 1280)   time_ids (B, 6)   y (B, 2816)
           emb (B, 1280) the time + added-conditioning embedding every ResBlock receives

Read next: model/vae.py (the autoencoder whose latents this UNet denoises).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.attention import attention


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4  # latent channels of x_t (the VAE's z)
    out_channels: int = 4  # ε̂ has the latent's shape
    model_channels: int = 320  # channels of the first level; also the width of t's sinusoid
    channel_mult: tuple[int, ...] = (1, 2, 4)  # level widths = model_channels × mult: 320, 640, 1280
    num_res_blocks: int = 2  # ResBlocks per level going down (going up: one more, for the downsample's skip)
    transformer_depth: tuple[int, ...] = (0, 2, 10)  # transformer blocks per SpatialTransformer, per level (0: none)
    transformer_depth_middle: int = 10  # transformer blocks in the middle block's SpatialTransformer
    context_dim: int = 2048  # cross-attention context width: CLIP-L 768 ++ bigG 1280
    adm_in_channels: int = 2816  # width of y: pooled bigG 1280 ++ 6 size/crop numbers × time_id_dim
    time_id_dim: int = 256  # sinusoid width per size/crop number; fixed by sgm's conditioner, no weight shows it
    head_dim: int = 64  # channels per attention head, everywhere in SDXL

    @property
    def time_embed_dim(self) -> int:
        # emb is 4 × model_channels wide (1280), as in every UNet since DDPM
        return 4 * self.model_channels


# -- Building blocks, in the order the forward pass meets them -------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) numbers t (N,) -> (N, dim), in float32."""
    half = dim // 2
    # ω_i = max_period^(−i/half),  i = 0 … half−1
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    # PITFALL: cos first, then sin (sgm's timestep_embedding; diffusers calls it flip_sin_to_cos=True,
    # freq_shift=0). The swapped order gives a plausible-looking but wrong embedding.
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the model's dtype (the UNet's and the VAE's):

        y = (x − μ_g) / √(σ²_g + ε) · γ_c + β_c

    with μ_g, σ²_g the mean and variance over the channels and pixels of channel c's group g."""

    def forward(self, x):
        # PITFALL: SDXL normalises in float32 (sgm's GroupNorm32): mean and variance over 10⁵–10⁷
        # bfloat16 values lose the digits that matter.
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Two 3×3 convolutions with the time embedding added in between, plus a skip path."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(32, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        # Slot 2 is sgm's Dropout (p = 0 for SDXL); the Identity keeps the official index of the conv.
        self.out_layers = nn.Sequential(GroupNorm32(32, out_ch), nn.SiLU(), nn.Identity(), nn.Conv2d(out_ch, out_ch, 3, padding=1))
        # A 1×1 conv only where the channel count changes (first ResBlock of a level, every up block).
        self.skip_connection = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):
        # h = conv(SiLU(GN(x))) + W·SiLU(emb);   out = skip(x) + conv(SiLU(GN(h)))
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x over itself (attn1) or over the text context (attn2)."""

    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        self.heads = dim // head_dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))  # sgm's Dropout would sit at index 1

    def forward(self, x, context=None):
        context = x if context is None else context
        # q from x, k and v from the context: (B, L, heads·D) -> (B, heads, L, D)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for z in (self.to_q(x), self.to_k(context), self.to_v(context)))
        # softmax(q·kᵀ/√D)·v per head
        return self.to_out(attention(q, k, v).transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """GEGLU(x) = a ⊙ GELU(g) with [a, g] = proj(x) (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # index 1 is sgm's Dropout (p = 0); the Identity keeps ff.net.2 at its official name
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention to the text, GEGLU MLP."""

    def __init__(self, dim: int, context_dim: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, dim, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        # the text conditions the image here, and only here
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """A feature map as a sequence of H·W tokens through `depth` transformer blocks, plus a residual."""

    def __init__(self, channels: int, depth: int, context_dim: int, head_dim: int):
        super().__init__()
        # eps 1e-6 here, unlike the ResBlocks' 1e-5 (sgm's Normalize vs normalization)
        self.norm = GroupNorm32(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)  # SDXL projects with Linear layers, not 1×1 convs
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(channels, context_dim, head_dim) for _ in range(depth)])
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H·W, C)
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        h = self.proj_out(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour ×2 (or to `size`), then a 3×3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        # `size`: the skip connection's size, which is not 2× ours when a level had an odd size
        # (a 1000 px image: latents of 125 -> 63 -> 32 on the way down, 32 -> 63 -> 125 up)
        return self.conv(F.interpolate(x, size=size, mode="nearest") if size else
                         F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Sequential):
    """One numbered entry of input_blocks / output_blocks / middle_block (sgm's
    TimestepEmbedSequential): ResBlocks get emb, SpatialTransformers get the context."""

    def forward(self, h, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, Upsample):
                h = layer(h, size)
            else:
                h = layer(h)
        return h


# -- The model -------------------------------------------------------------------------------


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig = UNetConfig()):
        super().__init__()
        self.config = cfg
        C, E = cfg.model_channels, cfg.time_embed_dim

        def transformer(ch, depth):
            return [SpatialTransformer(ch, depth, cfg.context_dim, cfg.head_dim)] if depth else []

        # t: sinusoid (320) -> MLP -> emb (1280)
        self.time_embed = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
        # y (2816) -> MLP -> added to emb; sgm nests this MLP in one more Sequential, hence label_emb.0.0
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, E), nn.SiLU(), nn.Linear(E, E)))

        # Down: a conv from latent to features, then per level num_res_blocks × (ResBlock
        # [+ SpatialTransformer]) and a Downsample (but not after the last level).
        # Every input block's output is a skip; remember its channel count for the way up.
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, C, 3, padding=1))])
        skip_channels, ch = [C], C
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, C * mult, E), *transformer(C * mult, cfg.transformer_depth[level])]
                ch = C * mult
                self.input_blocks.append(Block(*layers))
                skip_channels.append(ch)
            if level < len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = Block(ResBlock(ch, ch, E), SpatialTransformer(ch, cfg.transformer_depth_middle, cfg.context_dim,
                                                                      cfg.head_dim), ResBlock(ch, ch, E))

        # Up: per level (deepest first) num_res_blocks + 1 × (ResBlock on [h, skip] [+ SpatialTransformer]),
        # the last one of each level but the top followed by an Upsample.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                ch_in = ch + skip_channels.pop()
                layers = [ResBlock(ch_in, C * mult, E), *transformer(C * mult, cfg.transformer_depth[level])]
                ch = C * mult
                if level > 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(*layers))

        self.out = nn.Sequential(GroupNorm32(32, ch), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

        # Training sets this: each block's activations are recomputed in backward instead of stored.
        self.gradient_checkpointing = False

    def _run(self, block, h, emb, context, size=None):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, size, use_reentrant=False)
        return block(h, emb, context, size)

    def forward(self, x_t, t, context, pooled, time_ids):
        """ε̂ = ε_θ(x_t, t, context, y) with y = pooled ++ sinusoids(time_ids).

        x_t (B, 4, h, w); t (B,) or one number, int or float; context (B, 77, 2048);
        pooled (B, 1280); time_ids (B, 6) = (orig_h, orig_w, crop_top, crop_left, target_h, target_w)."""
        cfg, dtype, B = self.config, next(self.parameters()).dtype, x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(B)

        # PITFALL: the added conditioning is pooled (1280) ++ one 256-wide sinusoid per size/crop
        # number, in the order (orig_h, orig_w, crop_top, crop_left, target_h, target_w) = 2816.
        size_emb = timestep_embedding(time_ids.flatten(), cfg.time_id_dim).reshape(B, -1)
        y = torch.cat([pooled.float(), size_emb], dim=1)
        # emb = MLP(sinusoid(t)) + MLP(y): the one vector through which time and size reach every ResBlock
        emb = self.time_embed(timestep_embedding(t, cfg.model_channels).to(dtype)) + self.label_emb(y.to(dtype))
        context = context.to(dtype)

        # Down the U, keeping every block's output as a skip connection.
        h, skips = x_t.to(dtype), []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)

        h = self._run(self.middle_block, h, emb, context)

        # Up the U: each block starts from [h, the mirror-image skip] concatenated along channels.
        # An Upsample meets the size of the skip connection the next block takes.
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)

        return self.out(h)
