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

from model import ddim
from toyworld import base, world


FAMILIES = ("layernorm", "free")


def invert(model, who: world.Identity, concept: str, stats, family: str = "layernorm", steps: int = 200,
           batch: int = 8, images: int = 32, lr: float = 5e-2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_l, w_g) for one person: `images` renders of `who`, the ε-prediction loss of the base model
    at t ~ U[0, 1000) with the words inserted before `concept` in a caption naming the scene.
    `stats`: (mean, std) of each encoder's token table, in the mapper's order (CLIP-L, bigG)."""
    for frozen in (model.unet, model.clip_l, model.clip_g, model.vae):
        frozen.requires_grad_(False)  # only the words learn
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    places = [world.draw_placement(rng) for _ in range(images)]
    pixels = torch.from_numpy(np.stack([world.render(who, at)[0] for at in places])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        x0 = base.encode_means(model.vae, pixels) * base.SCALING_FACTOR
    captions = [world.prompt(concept, world.SCENES[at.scene]) for at in places]
    v = [torch.randn(mean.numel(), generator=g).requires_grad_() for mean, _ in stats]
    opt = torch.optim.Adam(v, lr=lr)
    bars = ddim.alpha_bars().float()
    time_ids = model.time_ids(world.SIZE, world.SIZE, batch, model.device)

    def words():
        out = []
        for vk, (mean, std) in zip(v, stats):
            u = F.layer_norm(vk, vk.shape) if family == "layernorm" else vk
            out.append(mean + std * u)
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
