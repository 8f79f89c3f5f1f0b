"""DDIM: the noise schedule, the x̂₀ estimate, one denoising step, and the sampling loop.

SDXL was trained as a discrete-time diffusion model with T = 1000 noise levels; at inference we
walk a short subsequence of them with DDIM (Song et al. 2021, "Denoising Diffusion Implicit
Models", eq. 12 and 16), steering each step with classifier-free guidance (Ho & Salimans 2022).
The schedule constants are SDXL base's (Stability-AI/generative-models, `sgm/modules/diffusionmodules/
discretizer.py`; diffusers' `scheduler/scheduler_config.json`), and every choice that changes the
image is made the way diffusers' DDIMScheduler and StableDiffusionXLPipeline make it, so the same
seed gives the same picture in both.

Notation (paper symbol ↔ variable):

    T            T                total training noise levels (1000)
    β_t          betas[t]         noise added at level t
    ᾱ_t          alpha_bar_t      ∏_{s≤t} (1 − β_s): x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε
    t, t_prev    t, t_prev        the current and the next (less noisy) sampled timestep
    ᾱ_prev       alpha_bar_prev   ᾱ at t_prev (ᾱ_0 after the last step)
    x_t          x_t              the noisy latent at level t; x_T the initial noise
    ε, ε̂         eps              true noise / the model's prediction of it
    ε_c, ε_u     eps_cond, eps_uncond   predictions with the prompt / with the negative prompt
    s            guidance         classifier-free guidance scale
    x̂₀           x0_hat           the clean latent implied by x_t and ε̂
    η            eta              0 = deterministic DDIM, 1 = DDPM-like ancestral noise
    σ_t          sigma_t          standard deviation of the fresh noise z in a step

Read next: model/sdxl.py (which calls `sample` with the UNet as the ε-function).
"""

import math
from collections.abc import Callable

import torch
from tqdm import tqdm

from model.errors import UserError

# SDXL base's training schedule (the `scheduler` config shipped with the official weights).
T = 1000  # number of training noise levels
BETA_START = 0.00085  # β at t = 0
BETA_END = 0.012  # β at t = T − 1
STEPS_OFFSET = 1  # "leading" spacing shifted by one: SDXL samples t = 1, …, never t = 0


# -- The schedule ----------------------------------------------------------------------------


def alpha_bars(T: int = T, beta_start: float = BETA_START, beta_end: float = BETA_END) -> torch.Tensor:
    """ᾱ_t for t = 0 … T−1 under the "scaled_linear" schedule, shape (T,), float64.

    Computed in float32 as diffusers does (its `alphas_cumprod`), then widened so every coefficient
    derived from them is float64. sgm's float64 cumprod differs by ≤ 1e-6 relative, invisible;
    matching diffusers makes images reproducible across the two."""
    # PITFALL: SDXL's betas are linear in √β ("scaled_linear"), not in β.
    # β_t = (√β_start + t/(T−1)·(√β_end − √β_start))²
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    # ᾱ_t = ∏_{s≤t} (1 − β_s)
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float64)


def check_steps(num_steps: int) -> None:
    if not 1 <= num_steps <= T - STEPS_OFFSET:  # more steps would need t = T
        raise UserError(f"--steps {num_steps}: use at least 1 step and at most {T - STEPS_OFFSET}")


def timesteps(num_steps: int) -> torch.Tensor:
    """The `num_steps` timesteps DDIM visits, descending, as a CPU LongTensor (30 steps: 958, 925, …, 34, 1)."""
    check_steps(num_steps)
    # PITFALL: SDXL uses "leading" spacing with offset 1; "trailing" or "linspace" give other images.
    # t_k = k·⌊T/n⌋ + offset,  k = 0 … n−1, visited from the noisiest down
    return (torch.arange(num_steps, dtype=torch.long) * (T // num_steps) + STEPS_OFFSET).flip(0)


# -- Forward process and the x̂₀ estimate (used by training and by every sampling step) ------


def _per_sample(c, x: torch.Tensor):
    """A coefficient (a Python float, or a (B,) tensor with one value per sample) in a form that
    multiplies x (B, …): tensors are cast to x's dtype and device only after their float64 math."""
    if isinstance(c, torch.Tensor):
        # cast where c is, then move: a float64 tensor never reaches a device without float64 (MPS)
        return c.to(dtype=x.dtype).to(x.device).reshape(-1, *[1] * (x.ndim - 1))
    return c


def add_noise(x0: torch.Tensor, eps: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """Diffuse clean latents to level t. `alpha_bar_t`: a float or a (B,) tensor (one per sample)."""
    # x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε
    return _per_sample(alpha_bar_t**0.5, x0) * x0 + _per_sample((1 - alpha_bar_t) ** 0.5, x0) * eps


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t) -> torch.Tensor:
    """The clean latent the noise prediction implies (DDIM eq. 12's "predicted x₀"); inverts
    `add_noise`. `alpha_bar_t`: a float or a (B,) tensor. Differentiable in `eps` (the CoCoIns
    losses compare these estimates)."""
    # x̂₀ = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t
    return (x_t - _per_sample((1 - alpha_bar_t) ** 0.5, x_t) * eps) / _per_sample(alpha_bar_t**0.5, x_t)


# -- One DDIM step ---------------------------------------------------------------------------


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_prev: float,
              eta: float = 0.0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_t → x_{t_prev} (DDIM eq. 12 with σ_t from eq. 16). `noise` is z ~ N(0, I), needed when
    η > 0. The ᾱ are Python floats: the coefficients are computed on the host in float64 and the
    step launches no host↔device synchronisation."""
    x0_hat = x0_from_eps(x_t, eps, alpha_bar_t)
    # σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_prev)
    sigma_t = eta * math.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * math.sqrt(1 - alpha_bar_t / alpha_bar_prev)
    # x_{t_prev} = √ᾱ_prev·x̂₀ + √(1−ᾱ_prev−σ_t²)·ε̂ + σ_t·z   (DDIM, eq. 12)
    x_prev = math.sqrt(alpha_bar_prev) * x0_hat + math.sqrt(1 - alpha_bar_prev - sigma_t**2) * eps
    if eta > 0:
        x_prev = x_prev + sigma_t * noise
    return x_prev


# -- Random numbers, drawn as diffusers draws them -------------------------------------------


def randn(shape, generator: torch.Generator | list[torch.Generator] | None, device, dtype) -> torch.Tensor:
    """Standard normal noise as diffusers' `randn_tensor` draws it: on the generator's device (None:
    the global RNG, on `device`), in `dtype`, then moved to `device`; so model/sdxl.py's x_T from
    `torch.Generator("cpu").manual_seed(seed)` equals a diffusers user's (DDIM's noise scale is 1).
    A list of generators, one per row, draws each row as that image alone would be drawn."""
    if isinstance(generator, list):
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    # PITFALL: the numbers depend on how they are drawn, not only on the seed: drawing on the
    # GPU, or in float32 and then casting, gives other numbers for the same seed.
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


# -- The sampling loop with classifier-free guidance -----------------------------------------

EpsFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def check_eta(eta: float) -> None:
    if not 0 <= eta <= 1:
        raise UserError(f"--eta {eta}: use a number from 0 (deterministic DDIM) to 1 (DDPM-like noise)")


@torch.no_grad()
def sample(eps_fn: EpsFn, x_T: torch.Tensor, num_steps: int, guidance: float, eta: float = 0.0,
           generator: torch.Generator | list[torch.Generator] | None = None, progress: bool = False) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance: x_T (B, C, h, w) → x_0, same shape and dtype.

    `eps_fn(x_t, t) -> (ε_c, ε_u)`: x_t (B, C, h, w) in x_T's dtype and device, t a (B,) LongTensor
    there (one value); it returns the predictions with the prompt and with the negative prompt,
    each (B, C, h, w), typically from one UNet call on [x_t; x_t] then `.chunk(2)`. At guidance 1,
    ε̂ = ε_c and ε_u may be None (the guidance formula holds for every s ≠ 1; diffusers also
    ignores s < 1). `generator` feeds the η > 0 noise: the one that drew x_T reproduces diffusers'
    DDIMScheduler (a list: one per image, see `randn`); None uses the global RNG.
    The loop never synchronises host and device (no `.item()`, no per-step host→device copy)."""
    check_eta(eta)
    ts = timesteps(num_steps)
    alpha_bar = alpha_bars().tolist()  # Python floats: per-step coefficients stay on the host
    step = T // num_steps
    B = x_T.shape[0]
    t_device = ts.to(x_T.device)  # one copy before the loop; t_device[i] below is a view
    # The η-noise, drawn up front: the same numbers, in the same order, that
    # diffusers draws inside each step (one (B, …) draw per step), without a copy per step.
    z = [randn(x_T.shape, generator, x_T.device, x_T.dtype) for _ in range(num_steps)] if eta > 0 else None

    x_t = x_T
    for i, t in enumerate(tqdm(ts.tolist(), desc="sampling", disable=not progress)):
        eps_cond, eps_uncond = eps_fn(x_t, t_device[i].expand(B))
        # ε̂ = ε_u + s·(ε_c − ε_u)   (classifier-free guidance; s = 1 is the conditional model)
        eps = eps_cond if guidance == 1 else eps_uncond + guidance * (eps_cond - eps_uncond)
        # PITFALL: after the last step ᾱ_prev = ᾱ_0, not 1 (SDXL's set_alpha_to_one = False).
        t_prev = t - step
        alpha_bar_prev = alpha_bar[t_prev] if t_prev >= 0 else alpha_bar[0]
        x_t = ddim_step(x_t, eps, alpha_bar[t], alpha_bar_prev, eta, z[i] if z else None)
    return x_t
