"""The SDXL autoencoder (AutoencoderKL): images <-> latents.

SDXL's UNet never sees pixels. It denoises 4-channel latents 8x smaller than the image; this
file holds the variational autoencoder that maps between the two:

    x ∈ [-1, 1]^(3×H×W)  --encoder-->  q(z|x) = N(μ, σ²)   (4 × H/8 × W/8)
    z                     --decoder-->  x̂ ≈ x

    latents for the UNet  = z · SCALING_FACTOR
    image from UNet output = decode(latents / SCALING_FACTOR)

Reference: Stability-AI/generative-models (sgm), `sgm/models/autoencoder.py`,
`sgm/modules/diffusionmodules/model.py` (Encoder, Decoder, ResnetBlock, AttnBlock,
Downsample, Upsample) and `sgm/modules/distributions/distributions.py`
(DiagonalGaussianDistribution). Module names below are the official checkpoint's
`first_stage_model.*` names with that prefix stripped, so the official file loads by prefix
(model/checkpoint.py renames the diffusers folder layout into them).

Shape of the network (SDXL base numbers, `VAEConfig` defaults):

    encoder: conv_in 3->128; four levels of 128/256/512/512 channels, two ResNet blocks each,
             a stride-2 downsample after each level but the last (1024 px -> 128);
             mid: ResNet, single-head self-attention (one 512-wide head), ResNet;
             GroupNorm, swish, conv_out -> 2·4 channels (mean and log-variance)
    quant_conv (1x1) -> DiagonalGaussian
    post_quant_conv (1x1) -> decoder: the mirror image, three ResNet blocks per level and a
             nearest-neighbour 2x upsample + conv between levels, conv_out -> 3 channels.

Precision: the SDXL VAE overflows in float16 (decoder activations exceed 65504: NaN/black images).
It never runs in float16: the loader upcasts float16 weights to float32 (84 M parameters, 335 MB)
and `encode`/`decode` refuse a VAE cast to float16 afterwards. bfloat16 has float32's range and is
fine. (Finetunes like "sdxl-vae-fp16-fix" survive float16; float32 and bfloat16 suit every VAE.)

Read next: model/ddim.py (how the latents are sampled).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.attention import attention
from model.errors import UserError
from model.unet import GroupNorm32  # float32 statistics

# SDXL's latent scale: z · 0.13025 has roughly unit variance, which the UNet was trained on
# (sgm `scale_factor`, diffusers `scaling_factor`; SD 1.x used 0.18215).
SCALING_FACTOR = 0.13025


@dataclass
class VAEConfig:
    in_channels: int = 3  # image channels (RGB)
    out_channels: int = 3  # decoded image channels (RGB)
    ch: int = 128  # channels of the first (full-resolution) level
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # level i has ch·ch_mult[i] channels; one downsample between levels
    num_res_blocks: int = 2  # ResNet blocks per encoder level (the decoder has one more per level)
    z_channels: int = 4  # latent channels; the encoder outputs twice as many (mean and log-variance)
    norm_groups: int = 32  # GroupNorm groups (not stored in the weights; 32 in every SD/SDXL VAE)


# ----------------------------------------------------------------------------------------------
# Building blocks, in the order the encoder uses them.


def Normalize(channels: int, groups: int) -> GroupNorm32:
    # eps 1e-6, not PyTorch's default 1e-5 (sgm `Normalize`)
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """x + conv2(swish(norm2(conv1(swish(norm1(x)))))), with a 1x1 conv on x when widths differ."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = Normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = Normalize(out_ch, groups)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # "nin" = network-in-network, i.e. a 1x1 conv that changes the skip path's width
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        # swish(x) = x·sigmoid(x) = silu
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        # PITFALL: the padding is asymmetric: one zero column on the right and one zero row at
        # the bottom, none on the left/top (F.pad order: left, right, top, bottom). A symmetric
        # padding=1 conv gives the same shapes and shifts every latent by half a pixel.
        x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions; q, k, v and the output are 1x1 convs."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = Normalize(ch, groups)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        B, C, H, W = q.shape
        # one head, C wide: (B, C, H, W) -> (B, 1, H·W, C)
        # (contiguous: fused kernels want the head dimension packed, as it is after a Linear)
        q, k, v = (t.reshape(B, 1, C, H * W).transpose(-1, -2).contiguous() for t in (q, k, v))
        # softmax(q·kᵀ/√C)·v
        # PITFALL: this head is 512 wide and FlashAttention stops at 256; attention() never
        # forces flash on it, even when the user picked the flash backend.
        h = attention(q, k, v)
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class MidBlock(nn.Module):
    """ResNet, attention, ResNet at the lowest resolution (shared shape of encoder and decoder)."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch, groups)
        self.attn_1 = AttnBlock(ch, groups)
        self.block_2 = ResnetBlock(ch, ch, groups)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class EncoderLevel(nn.Module):
    """A container (Encoder.forward runs its parts): `block` ResNets, then a downsample but at the last level."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, downsample: bool, groups: int):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_blocks))
        self.downsample = Downsample(out_ch) if downsample else None


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2·z, H/2^(levels-1), W/2^(levels-1))."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        levels = len(widths)
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList(
            EncoderLevel(([cfg.ch] + widths)[i], widths[i], cfg.num_res_blocks, i != levels - 1, cfg.norm_groups)
            for i in range(levels)
        )
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        self.norm_out = Normalize(widths[-1], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class DiagonalGaussian:
    """q(z|x) = N(mean, exp(logvar)) per latent element (sgm DiagonalGaussianDistribution), of which
    only the mode is ever used (a latent is the mean, never a sample): the log-variance is not kept."""

    mean: torch.Tensor

    def mode(self):
        return self.mean


# ----------------------------------------------------------------------------------------------
# The decoder's blocks.


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DecoderLevel(nn.Module):
    """A container (Decoder.forward runs its parts): `block` ResNets, then an upsample but at level 0."""

    def __init__(self, in_ch: int, out_ch: int, num_blocks: int, upsample: bool, groups: int):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(num_blocks))
        self.upsample = Upsample(out_ch) if upsample else None


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, h·2^(levels-1), w·2^(levels-1))."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.ch * m for m in cfg.ch_mult]
        levels = len(widths)
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1], cfg.norm_groups)
        # `up[i]` is the level with the encoder's `down[i]` resolution and width, so it runs in
        # reverse order: up[levels-1] first (lowest resolution), up[0] last. Its input width
        # is the width of the level below it (or of the mid block).
        self.up = nn.ModuleList(
            DecoderLevel((widths + [widths[-1]])[i + 1], widths[i], cfg.num_res_blocks + 1, i != 0, cfg.norm_groups)
            for i in range(levels)
        )
        self.norm_out = Normalize(widths[0], cfg.norm_groups)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# The model.


class AutoencoderKL(nn.Module):
    """SDXL's VAE: `encode(x) -> DiagonalGaussian`, `decode(z) -> x`.

    `x` is an image batch (B, 3, H, W) in [-1, 1]; `z` is an *unscaled* latent: the UNet's
    latents are `z · SCALING_FACTOR`. Inputs of any float dtype are cast to the weights' dtype
    (float32 or bfloat16); outputs come back in that dtype."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        # 1x1 convs between the encoder/decoder and the latent (sgm's `embed_dim` == z_channels in SDXL)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def _dtype(self) -> torch.dtype:
        dtype = self.quant_conv.weight.dtype
        if dtype == torch.float16:
            # PITFALL: the SDXL VAE overflows in float16 (NaN/black images).
            raise UserError("the SDXL VAE overflows in float16, so keep it in float32 or bfloat16 "
                            "(model/checkpoint.py already loads float16 weights as float32)")
        return dtype

    def encode(self, x) -> DiagonalGaussian:
        mean, _logvar = self.quant_conv(self.encoder(x.to(self._dtype()))).chunk(2, dim=1)  # the moments
        return DiagonalGaussian(mean)

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z.to(self._dtype())))
