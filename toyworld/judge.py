"""The judge: a small classifier that reads a toy person's seven factors and the scene from an image.

In the paper, ArcFace reads identity from faces and CLIP reads the prompt from the image. The toy
world knows the truth behind every image it draws, so its judge is trained on rendered images
with known factors (fresh people, not only the world's 600, so it has seen every combination).
It also sees each image after a round trip through the toy VAE: generated images carry the VAE
decoder's softness, and a judge that never saw it would misread them.

What the judge gives eval.py:
    embedding   the seven identity factors' class probabilities, concatenated (24 numbers) and
                L2-normalised: the toy world's ArcFace feature, for Face Sim and Face Div
    factors     the most probable value of each factor: two images show the same person when
                all seven agree (identity agreement)
    scene       the most probable scene: the toy world's CLIP-T is how often it is the prompt's

Read next: toyworld/inversion.py (one word learned per person: what a pseudo-word can hold).
"""

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from toyworld import world

HEADS = {**{f: len(v) for f, v in world.FACTORS.items()}, "scene": len(world.SCENES)}
IDENTITY = tuple(world.FACTORS)  # the heads that make up a person


class Judge(nn.Module):
    def __init__(self):
        super().__init__()
        # 64 -> 32 -> 16 -> 8 -> 4 px, then one linear layer per head.
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 4, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.Conv2d(128, 128, 3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
            nn.Flatten(), nn.Linear(128 * 16, 256), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({name: nn.Linear(256, n) for name, n in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 (B, 3, 64, 64) -> logits per head."""
        h = self.features(images.float() / 127.5 - 1)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
        """uint8 images -> {"embedding": (B, 24), "factors": (B, 7) int, "scene": (B,) int}."""
        self.eval()
        logits = {name: [] for name in HEADS}
        for i in range(0, len(images), batch):
            for name, v in self(images[i : i + batch]).items():
                logits[name].append(v)
        logits = {k: torch.cat(v) for k, v in logits.items()}
        probs = torch.cat([logits[f].softmax(-1) for f in IDENTITY], dim=1)
        return {
            "embedding": F.normalize(probs, dim=1),
            "factors": torch.stack([logits[f].argmax(-1) for f in IDENTITY], dim=1),
            "scene": logits["scene"].argmax(-1),
        }


def render_set(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n rendered images (n, 3, 64, 64) uint8 of random people in random placements, and their labels (n, 8)."""
    rng = random.Random(seed)
    everyone = world.draw_identities(int(np.prod([len(v) for v in world.FACTORS.values()])), rng)
    images, labels = [], []
    for _ in range(n):
        who, at = rng.choice(everyone), world.draw_placement(rng)
        image, _ = world.render(who, at)
        images.append(image)
        labels.append([*(getattr(who, f) for f in world.FACTORS), at.scene])
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def accuracy(judge: Judge, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Per-head accuracy, plus 'person' (all seven identity factors right)."""
    out = judge.read(images)
    right = torch.cat([out["factors"], out["scene"][:, None]], dim=1) == labels
    acc = {name: right[:, i].float().mean().item() for i, name in enumerate(HEADS)}
    acc["person"] = right[:, : len(IDENTITY)].all(dim=1).float().mean().item()
    return acc


def train_judge(images: torch.Tensor, labels: torch.Tensor, steps: int = 800, batch: int = 128, seed: int = 0,
                log=print) -> Judge:
    """Cross-entropy on every head, AdamW, light augmentation (±2 px shifts, brightness ±10 %)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    judge.train()
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.randint(len(images), (batch,), generator=g)
        x = images[idx].float()
        dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
        x = torch.roll(x, (dy, dx), dims=(2, 3))
        x = (x * (0.9 + 0.2 * torch.rand(batch, 1, 1, 1, generator=g))).clamp(0, 255)
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[name], labels[idx, i]) for i, name in enumerate(HEADS))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 200 == 0 or step == steps:
            log(f"judge step {step}/{steps}  loss {loss.item():.3f}  {time.time() - t0:.0f}s")
    return judge.eval()
