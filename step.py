"""The CoCoIns training step: from a batch of images and captions to the loss (paper section 3.3, eq. 5-9).

For a batch of B images with latents x, two captions P1, P2 each naming the subject with a concept
word ("woman"), and a subject mask m:

    z1, z2 ~ N(0, I)            two codes per image (eq. 3), drawn fresh every step
    w1, w2 = f(z1), f(z2)       pseudo-words, one per text encoder
    e* = insert(e1, w1, i)      anchor:   P1 with code z1     (eq. 5; i, j: the concept in P1, P2)
    e+ = insert(e2, w1, j)      positive: P2 with code z1
    e- = insert(e1, w2, i)      negative: P1 with code z2
    x_t* = x_t- = √ᾱ_t·x + √(1−ᾱ_t)·ε1,   x_t+ = √ᾱ_t·x + √(1−ᾱ_t)·ε2     (eq. 6, one t)
    x̂*, x̂+, x̂-   x̂₀ estimates of the UNet with e*, e+, e-: one pass of 3B, gradients to f
    x̂1, x̂2       x̂₀ estimates with the plain e1 (on x_t*) and e2 (on x_t+): one pass of 2B, no gradients
    L = λ_con·L_con + λ_back·L_back            (losses.py, eq. 7-9)

SDXL (both text encoders, the UNet, the VAE) is frozen; gradients flow *through* the text
encoders and the UNet into f. Classifier-free guidance dropout is not used: f never meets an
empty prompt (a pseudo-word needs its concept word), and SDXL itself is not trained.

The page reads in the order a step runs: what a step may vary (`StepConfig`, the paper's
triplets and Table 5's ablations), the codes, noises and timesteps (`draw_noise`), the x̂₀ of a
UNet pass (`predict_x0`), then the step (`cocoins_step`). train.py runs it in a loop, with AdamW
on f, checkpoints and logs.

Read next: data.py (where the batch of images, captions and masks comes from).
"""

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from losses import LossConfig, LossTerms, cocoins_loss
from model import ddim
from model.sdxl import SDXL


@dataclass
class StepConfig:
    """How a triplet is built (eq. 5-6) and conditioned; the defaults are the paper's."""

    # The positive's caption: "other", the image's second caption P2 (eq. 5), so f must hold the
    # person across wordings; or "same", the anchor's P1 (Table 5, "same prompts").
    positive_prompt: str = "other"
    # The positive's noise: "other", its own ε2 (eq. 6), so f must hold the person across noises;
    # or "same", the anchor's ε1 (Table 5, "same noise").
    positive_noise: str = "other"
    # SDXL's size/crop micro-conditioning: "data", each image's own (orig_h, orig_w, crop_top,
    # crop_left, R, R), as SDXL was trained, so the UNet is told the truth about the image it
    # denoises; or "sampling", (R, R, 0, 0, R, R), what sample.py passes, so f is trained under the
    # conditioning it will be used with. The paper does not say. Measured in the toy world (its base
    # model trained on originals of every size, its mapper on 44 x 54 files as CelebA's are small and
    # not square; toyworld/RESULTS.md, "Size conditioning in training", 3 mapper seeds on base seed 0):
    # "data" Face Sim 0.817 ± 0.024, identity agreement 0.111 ± 0.012; "sampling" 0.793 ± 0.014 and
    # 0.088 ± 0.006. "data" is no worse, a little better on agreement, so it stays the default.
    time_ids: str = "data"


TRIPLET_CHOICES = ("other", "same")  # positive_prompt, positive_noise
TIME_IDS = ("data", "sampling")


# -- the step's random numbers -------------------------------------------------------------------

# The training timesteps t ~ U[T_MIN, T_MAX) (train.py's --t-min, --t-max). Below 200 (ᾱ > 0.75)
# x_t already shows the face: x̂₀ is the image whatever the pseudo-word says, so the positive term
# is trivially small and 1/d_neg blows up on distances f cannot create. Above 800 (ᾱ < 0.04),
# x̂₀ = (x_t − √(1−ᾱ)·ε̂)/√ᾱ multiplies every error of ε̂ by more than 5 (by 15 at t = 999): the
# estimate is an amplified blur in which a face's identity is noise. In between, the pseudo-word
# decides who appears and x̂₀ shows it.
T_MIN, T_MAX = 200, 800


@dataclass
class StepNoise:
    z1: Tensor  # (B, c) the code of the anchor and the positive
    z2: Tensor  # (B, c) the code of the negative
    eps1: Tensor  # (B, 4, h, w) ε1, the noise of the anchor and the negative
    eps2: Tensor  # (B, 4, h, w) ε2, the noise of the positive
    t: Tensor  # (B,) the timestep, shared by the three samples of a triplet


def draw_noise(seed: int, rank: int, step: int, B: int, latent_shape, z_dim: int, t_min: int, t_max: int) -> StepNoise:
    """The codes, noises and timesteps of one step, a pure function of (seed, rank, step).

    A fresh CPU generator per step means a resumed run draws exactly what the uninterrupted
    run drew, on any device, with no generator state to carry; each rank draws its own."""
    g = torch.Generator("cpu").manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1, np.uint64)[0]))
    # z ~ N(0, I) directly, the paper's eq. 3: a fresh pair of codes per image and step covers
    # the whole code space sample.py draws from (code_to_z is that same N(0, I) seeded by an
    # integer; integer codes here would add nothing but a generator per code). Two independent
    # draws in c = 512 dimensions are never equal, so z1 ≠ z2.
    z1, z2 = torch.randn(2, B, z_dim, generator=g)
    eps1, eps2 = torch.randn(2, B, *latent_shape, generator=g)
    # t ~ U[t_min, t_max)
    t = torch.randint(t_min, t_max, (B,), generator=g)
    return StepNoise(z1, z2, eps1, eps2, t)


# -- γ's unit ------------------------------------------------------------------------------------

# Under gamma_unit "d_neg" (losses.py), the first GAMMA_WARMUP steps measure D, the mean d_m(x̂*, x̂-) of two
# codes' x̂₀ estimates, with no negative term (λ_neg = 0: a ramp from 0 would push little there anyway); from
# then on λ_neg = γ·D²·(k/K)^β. 20 steps of a batch of 4 or more average 80+ pairs of codes.
GAMMA_WARMUP = 20


class GammaScale:
    """γ's unit, the factor on λ_neg: 1 ("absolute"), or D² ("d_neg"), D the mean d_neg of the run's first
    GAMMA_WARMUP steps (0 during them). `seen` (the logged d_neg of those steps) is what state.pt keeps, so a
    resumed run goes on in the same unit."""

    def __init__(self, unit: str, seen: list[float] | None = None):
        self.unit, self.seen = unit, list(seen or [])

    def value(self) -> float:
        if self.unit == "absolute":
            return 1.0
        if len(self.seen) < GAMMA_WARMUP:
            return 0.0
        # γ in units of D²: the push γ·D²/d² of the reciprocal is then the same at the distances this model has
        return float(np.mean(self.seen[:GAMMA_WARMUP])) ** 2

    def observe(self, d_neg: float) -> None:
        if self.unit == "d_neg" and len(self.seen) < GAMMA_WARMUP:
            self.seen.append(d_neg)


# -- the step ------------------------------------------------------------------------------------


def predict_x0(model: SDXL, x_t: Tensor, t: Tensor, alpha_bar_t: Tensor, context: Tensor, pooled: Tensor,
               time_ids: Tensor) -> Tensor:
    """x̂₀ = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t from one UNet pass, in float32."""
    eps_hat = model.unet(x_t, t, context, pooled, time_ids).float()
    return ddim.x0_from_eps(x_t, eps_hat, alpha_bar_t)


def cocoins_step(model: SDXL, f, x0: Tensor, batch: dict, noise: StepNoise, k: int, K: int, loss_config: LossConfig,
                 step_config: StepConfig = StepConfig(), gamma_scale: float = 1.0) -> LossTerms:
    """The CoCoIns loss of one batch (eq. 5-9); call `.total.backward()` to reach f.

    x0 (B, 4, h, w) scaled VAE latents; `batch` from data.collate (captions, concept, mask,
    time_ids); `noise` from `draw_noise`; k the step (1 … K) that sets λ_neg = γ·(k/K)^β;
    `step_config` the triplet's ablations (the paper's triplets by default); `gamma_scale` γ's unit
    (`GammaScale.value`)."""
    device = model.device
    P1 = [p1 for p1, _ in batch["captions"]]
    # P2, the positive's caption (P1 again for Table 5's "same prompts")
    P2 = P1 if step_config.positive_prompt == "same" else [p2 for _, p2 in batch["captions"]]
    concepts = batch["concept"]
    x0, eps1 = x0.to(device).float(), noise.eps1.to(device)
    # ε2, the positive's noise (ε1 again for Table 5's "same noise")
    eps2 = eps1 if step_config.positive_noise == "same" else noise.eps2.to(device)
    t = noise.t.to(device)
    # (B,) float64, kept on the CPU: the coefficients' float64 math runs there (MPS has no float64)
    alpha_bar_t = ddim.alpha_bars()[noise.t.cpu()]
    if step_config.time_ids == "sampling":
        # (H, W, 0, 0, H, W), as model.generate conditions an image of this size
        time_ids = SDXL.time_ids(x0.shape[-2] * 8, x0.shape[-1] * 8, x0.shape[0], device)
    else:
        time_ids = batch["time_ids"].to(device)
    mask = batch["mask"].to(device)

    # x_t* = x_t- = √ᾱ_t·x + √(1−ᾱ_t)·ε1,  x_t+ = √ᾱ_t·x + √(1−ᾱ_t)·ε2   (eq. 6)
    x_t1 = ddim.add_noise(x0, eps1, alpha_bar_t)
    x_t2 = ddim.add_noise(x0, eps2, alpha_bar_t)

    # w1 = f(z1), w2 = f(z2): one pass of f over 2B codes (once per step, as DDP expects).
    w_l, w_g = f(torch.cat([noise.z1, noise.z2]).to(device))
    w1_l, w2_l, w1_g, w2_g = (*w_l.chunk(2), *w_g.chunk(2))

    # e* = insert(e1, w1, i), e+ = insert(e2, w1, j), e- = insert(e1, w2, i)   (eq. 5), as one batch
    # (each prompt's pseudo-word goes before that prompt's own concept word)
    context, pooled = model.encode_prompt(
        P1 + P2 + P1, [(torch.cat([w1_l, w1_l, w2_l]), torch.cat([w1_g, w1_g, w2_g]), concepts * 3)])
    # The three UNet passes with gradients as one of 3B: anchor, positive, negative.
    x0_hat = predict_x0(model, torch.cat([x_t1, x_t2, x_t1]), t.repeat(3), alpha_bar_t.repeat(3),
                        context, pooled, time_ids.repeat(3, 1))
    x_anchor, x_pos, x_neg = x0_hat.chunk(3)

    # x̂1 = x̂(x_t*, e1), x̂2 = x̂(x_t+, e2): the plain prompts, the targets of L_back; no gradients.
    with torch.no_grad():
        context0, pooled0 = model.encode_prompt(P1 + P2)
        x1, x2 = predict_x0(model, torch.cat([x_t1, x_t2]), t.repeat(2), alpha_bar_t.repeat(2),
                            context0, pooled0, time_ids.repeat(2, 1)).chunk(2)

    # The step's words in units of each encoder's token spread, for L_spread (and its log line).
    heads = getattr(f, "module", f).heads  # f itself, or f inside DDP
    words = tuple((w - h.token_mean) / h.token_std for w, h in zip((w_l, w_g), heads))
    # L = λ_con·L_con + λ_back·L_back (+ λ_spread·L_spread, off by default)   (losses.py, eq. 7-9)
    return cocoins_loss(x_anchor, x_pos, x_neg, x1, x2, mask, k, K, loss_config, words, gamma_scale)
