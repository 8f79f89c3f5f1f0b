"""One word per person, learned directly: how much of a person a single pseudo-word can hold here.

CoCoIns asks one inserted word to fix a whole person. Whether one word *can* do that is a property
of the base model (its text encoders and UNet), not of the mapper or its loss. Textual inversion
answers it: for each evaluation code's person (`experiment.code_person`, the person `named_jobs` describes
in words), one word per text encoder is optimised, with the base model's own denoising loss, on
renders of that person in random scenes and poses, inserted before the concept word exactly as a
pseudo-word is. The words are then used as that code's pseudo-word and scored like any row.

Two families of word:
    "layernorm"  w = μ + σ⊙LayerNorm(v): the words the default mapper can produce (gain 1)
    "free"       w = μ + σ⊙v: any vector, as loud as the loss wants (the plain MLP's family)

This is supervised (it sees the person); CoCoIns never does. So it bounds a pseudo-word from
above: a mapper that falls short of it is limited by its loss or training, one that reaches it by
what one word can say to this base model.

Read next: toyworld/experiment.py (the rows that use these words).
"""

import random

import numpy as np
import torch
import torch.nn.functional as F

import train
from model import ddim
from model.mapper import code_to_z
from toyworld import base, world


FAMILIES = ("layernorm", "free")


class TokenStats:
    """A token table's per-dimension mean and std (`token_mean`, `token_std`), as a mapper's heads carry them."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.token_mean, self.token_std = mean, std


def token_stats(model) -> list[TokenStats]:
    """The two encoders' token statistics, in the mapper's order, as train.py computes them for f."""
    return [TokenStats(mean, std) for mean, std in train.token_stats(model)]


class WordTable(torch.nn.Module):
    """Learned words looked up by code, shaped like a Mapper for `experiment.generate` and
    `experiment.pseudo_word_stats` (which draw z from the code and call the module on it)."""

    def __init__(self, codes: list[int], words: list[tuple[torch.Tensor, torch.Tensor]], heads, z_dim: int = 8):
        super().__init__()
        self.config = type("Config", (), {"z_dim": z_dim})()
        self.heads = heads  # the token statistics, as a mapper's heads carry them
        self.z = torch.stack([code_to_z(c, z_dim) for c in codes])
        self.w_l = torch.stack([w for w, _ in words])
        self.w_g = torch.stack([w for _, w in words])

    def forward(self, z: torch.Tensor):
        index = [int((self.z == row).all(dim=1).nonzero()[0]) for row in z]  # codes outside the table fail here
        return self.w_l[index], self.w_g[index]


def invert(model, who: world.Identity, concept: str, heads, family: str = "layernorm", steps: int = 200,
           batch: int = 8, images: int = 32, lr: float = 5e-2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_l, w_g) for one person: `images` renders of `who`, the ε-prediction loss of the base model
    at t ~ U[0, 1000) with the words inserted before `concept` in a caption naming the scene."""
    for frozen in (model.unet, model.clip_l, model.clip_g, model.vae):
        frozen.requires_grad_(False)  # only the words learn
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    places = [world.draw_placement(rng) for _ in range(images)]
    pixels = torch.from_numpy(np.stack([world.render(who, at)[0] for at in places])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        x0 = base.encode_means(model.vae, pixels) * base.SCALING_FACTOR
    captions = [world.prompt(concept, world.SCENES[at.scene]) for at in places]
    v = [torch.randn(h.token_mean.numel(), generator=g).requires_grad_() for h in heads]
    opt = torch.optim.Adam(v, lr=lr)
    bars = ddim.alpha_bars().float()
    time_ids = model.time_ids(world.SIZE, world.SIZE, batch, model.device)

    def words():
        out = []
        for vk, h in zip(v, heads):
            u = F.layer_norm(vk, vk.shape) if family == "layernorm" else vk
            out.append(h.token_mean + h.token_std * u)
        return out

    for _ in range(steps):
        idx = torch.randint(images, (batch,), generator=g)
        t = torch.randint(0, ddim.T, (batch,), generator=g)
        eps = torch.randn(x0[idx].shape, generator=g)
        x_t = ddim.add_noise(x0[idx], eps, bars[t])
        w_l, w_g = words()
        context, pooled = model.encode_prompt([captions[i] for i in idx], [(w_l, w_g, concept)])
        loss = F.mse_loss(model.unet(x_t, t, context, pooled, time_ids).float(), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return tuple(w.detach() for w in words())
