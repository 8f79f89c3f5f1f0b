"""model/ddim.py against diffusers' DDIMScheduler configured as SDXL base ships it."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.utils.torch_utils import randn_tensor

from model import ddim
from model.errors import UserError

KEYS = os.path.join(os.path.dirname(__file__), "data", "sdxl_keys.json")


def sdxl_scheduler() -> DDIMScheduler:
    # The official `scheduler/scheduler_config.json` (an EulerDiscrete config) turned into DDIM,
    # as users do with `DDIMScheduler.from_config(pipe.scheduler.config)`.
    with open(KEYS) as f:
        config = json.load(f)["diffusers_configs"]["scheduler"]
    return DDIMScheduler.from_config(config)


def test_scheduler_config_is_sdxls():
    s = sdxl_scheduler().config
    assert (s.beta_schedule, s.beta_start, s.beta_end, s.num_train_timesteps) == ("scaled_linear", 0.00085, 0.012, 1000)
    assert (s.timestep_spacing, s.steps_offset, s.set_alpha_to_one, s.clip_sample) == ("leading", 1, False, False)
    assert s.prediction_type == "epsilon"


def test_alpha_bars_equal_diffusers_alphas_cumprod_bit_for_bit():
    ours = ddim.alpha_bars()
    assert ours.dtype == torch.float64 and ours.shape == (1000,)
    assert torch.equal(ours.float(), sdxl_scheduler().alphas_cumprod)
    # A linear-in-β schedule ends near 4e-5; scaled_linear ends near 0.00466.
    assert abs(ours[-1].item() - 0.004660) < 1e-5 and abs(ours[0].item() - 0.99915) < 1e-7


def test_timesteps_equal_diffusers_for_every_valid_step_count():
    sched = sdxl_scheduler()
    for n in range(1, 1000):
        sched.set_timesteps(n)
        assert torch.equal(ddim.timesteps(n), sched.timesteps), n
    assert ddim.timesteps(30)[[0, 1, -1]].tolist() == [958, 925, 1]


@pytest.mark.parametrize("n", [0, 1000, -3])
def test_timesteps_reject_impossible_step_counts_in_one_sentence(n):
    with pytest.raises(UserError, match=f"--steps {n}: use at least 1 step and at most 999"):
        ddim.timesteps(n)


def test_add_noise_matches_diffusers_and_x0_from_eps_inverts_it():
    sched = sdxl_scheduler()
    x0, eps = torch.randn(3, 4, 6, 5), torch.randn(3, 4, 6, 5)
    t = torch.tensor([1, 500, 999])
    alpha_bar_t = ddim.alpha_bars()[t]  # one ᾱ per sample: shape (B,)
    x_t = ddim.add_noise(x0, eps, alpha_bar_t)
    assert x_t.dtype == torch.float32  # float64 coefficients must not promote the latents
    torch.testing.assert_close(x_t, sched.add_noise(x0, eps, t))
    torch.testing.assert_close(ddim.x0_from_eps(x_t, eps, alpha_bar_t), x0, rtol=1e-4, atol=1e-4)
    # a single float ᾱ broadcasts the same way
    a = ddim.alpha_bars()[500].item()
    torch.testing.assert_close(ddim.x0_from_eps(ddim.add_noise(x0, eps, a), eps, a), x0, rtol=1e-5, atol=1e-5)


def test_x0_from_eps_is_differentiable_in_eps():
    x_t = torch.randn(2, 4, 3, 3)
    eps = torch.randn(2, 4, 3, 3, requires_grad=True)
    alpha_bar_t = ddim.alpha_bars()[torch.tensor([10, 900])]
    ddim.x0_from_eps(x_t, eps, alpha_bar_t).sum().backward()
    # ∂x̂₀/∂ε = −√(1−ᾱ_t)/√ᾱ_t, per sample
    expected = -((1 - alpha_bar_t) / alpha_bar_t).sqrt().float()
    torch.testing.assert_close(eps.grad[:, 0, 0, 0], expected)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("n", [1, 7, 30, 50, 500, 999])
def test_single_steps_equal_diffusers_ddim_step(n, eta):
    sched = sdxl_scheduler()
    sched.set_timesteps(n)
    alpha_bar = ddim.alpha_bars().tolist()
    x_t, eps = torch.randn(2, 4, 6, 5), torch.randn(2, 4, 6, 5)
    # every step for short schedules; the first, middle and last ones for long ones
    for t in sorted({*sched.timesteps[:3].tolist(), sched.timesteps[n // 2].item(), *sched.timesteps[-3:].tolist()}):
        expected = sched.step(eps, t, x_t, eta=eta, generator=torch.Generator().manual_seed(t)).prev_sample
        t_prev = t - 1000 // n
        alpha_bar_prev = alpha_bar[t_prev] if t_prev >= 0 else alpha_bar[0]
        z = ddim.randn(x_t.shape, torch.Generator().manual_seed(t), "cpu", torch.float32)
        ours = ddim.ddim_step(x_t, eps, alpha_bar[t], alpha_bar_prev, eta, z)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5, msg=f"t={t}")


def test_last_step_lands_on_alpha_bar_0_not_1():
    # set_alpha_to_one=False: the last step from t=1 goes to ᾱ_0 < 1, so x̂₀ is not returned as is.
    x_t, eps = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    out = ddim.sample(lambda x, t: (eps, eps), x_t, 1, guidance=1.0)
    a_t, a_0 = ddim.alpha_bars()[[1, 0]].tolist()
    x0_hat = ddim.x0_from_eps(x_t, eps, a_t)
    torch.testing.assert_close(out, a_0**0.5 * x0_hat + (1 - a_0) ** 0.5 * eps)
    assert not torch.allclose(out, x0_hat, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (3, 4, 6, 5)])
def test_initial_noise_equals_diffusers_randn_tensor(shape, dtype):
    expected = randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(42), device=torch.device("cpu"), dtype=dtype)
    ours = ddim.randn(shape, torch.Generator("cpu").manual_seed(42), "cpu", dtype)
    assert ours.dtype == dtype and torch.equal(ours, expected)


def test_initial_noise_equals_the_sdxl_pipelines_starting_latents():
    # The pipeline's own prepare_latents (unbound; it only reads these two attributes).
    pipe = SimpleNamespace(vae_scale_factor=8, scheduler=sdxl_scheduler())
    expected = StableDiffusionXLPipeline.prepare_latents(pipe, 2, 4, 48, 40, torch.float32, torch.device("cpu"),
                                                         torch.Generator("cpu").manual_seed(3))
    assert torch.equal(ddim.randn((2, 4, 6, 5), torch.Generator("cpu").manual_seed(3), "cpu", torch.float32), expected)


def fake_unet(x, t, cond):
    """A nonlinear stand-in for the UNet: depends on the latents, the timestep and a per-row
    "conditioning" scalar, so that guidance and step order matter."""
    t = t.float().reshape(-1, 1, 1, 1) / 1000
    return torch.sin(1.7 * x + cond.reshape(-1, 1, 1, 1)) * (0.5 + t) + 0.1 * x


def diffusers_loop(x_T, n, guidance, eta, generator, cond, uncond):
    """The StableDiffusionXLPipeline denoising loop with its DDIM scheduler, UNet replaced."""
    sched = sdxl_scheduler()
    if x_T.dtype == torch.float64:
        # Same ᾱ values, but coefficients computed in float64 (as ours are) instead of float32.
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    sched.set_timesteps(n)
    latents = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        model_input = torch.cat([latents] * 2) if guidance > 1 else latents
        c = torch.cat([uncond, cond]) if guidance > 1 else cond
        noise_pred = fake_unet(model_input, t.expand(model_input.shape[0]), c)
        if guidance > 1:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        latents = sched.step(noise_pred, t, latents, eta=eta, generator=generator).prev_sample
    return latents


# float64: the same algorithm to rounding (1e-13 observed). float32, as users run it: diffusers
# rounds its step coefficients to float32 and ours are float64, so the chaotic fake UNet amplifies
# one-ulp differences to ~1e-4 on values ~30 over 30 guided steps; a wrong step is off by O(1).
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 3e-4)])
@pytest.mark.parametrize(
    "n, guidance, eta",
    [(30, 5.0, 0.0), (30, 7.5, 1.0), (12, 5.0, 1.0), (50, 1.0, 0.0), (4, 3.0, 0.5)],
)
def test_sampling_loop_equals_diffusers_pipeline_loop(n, guidance, eta, dtype, tol):
    shape = (2, 4, 6, 5)
    cond, uncond = torch.tensor([0.3, -0.2], dtype=dtype), torch.tensor([0.0, 0.0], dtype=dtype)
    generator = torch.Generator("cpu").manual_seed(11)
    x_T = randn_tensor(shape, generator=generator, device=torch.device("cpu"), dtype=dtype)
    expected = diffusers_loop(x_T, n, guidance, eta, generator, cond, uncond)

    calls = []

    def eps_fn(x_t, t):
        calls.append(t)
        eps = fake_unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([uncond, cond]))
        eps_uncond, eps_cond = eps.chunk(2)
        return eps_cond, eps_uncond

    # as model/sdxl.py does: the generator draws x_T, then keeps drawing the η-noise
    ours_generator = torch.Generator("cpu").manual_seed(11)
    ours_x_T = ddim.randn(shape, ours_generator, "cpu", dtype)
    assert torch.equal(ours_x_T, x_T)
    ours = ddim.sample(eps_fn, ours_x_T, n, guidance, eta, ours_generator)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, expected, rtol=tol, atol=tol)
    assert [t.tolist() for t in calls] == [[t, t] for t in ddim.timesteps(n).tolist()]
    assert all(t.dtype == torch.long for t in calls)


def test_eta_noise_comes_from_the_given_generator():
    x_T = torch.randn(1, 4, 4, 4)
    run = lambda seed: ddim.sample(lambda x, t: (0.5 * x, None), x_T, 5, 1.0, 1.0, torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_guidance_one_never_reads_the_unconditional_prediction():
    x_T = torch.randn(1, 4, 4, 4)
    out = ddim.sample(lambda x, t: (0.5 * x, None), x_T, 10, guidance=1.0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("eta", [-0.1, 1.5])
def test_eta_outside_zero_one_is_a_user_error(eta):
    with pytest.raises(UserError, match=f"--eta {eta}: use a number from 0"):
        ddim.sample(lambda x, t: (x, x), torch.zeros(1, 4, 2, 2), 10, 5.0, eta)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_sampling_loop_never_synchronises_with_the_gpu():
    x_T = ddim.randn((2, 4, 16, 16), gen := torch.Generator().manual_seed(1), "cuda", torch.bfloat16)
    calls = []

    def eps_fn(x_t, t):
        if not calls:  # the loop has begun: from here on any host-device sync raises
            torch.cuda.set_sync_debug_mode("error")
        calls.append(t)
        return torch.sin(x_t) * t.reshape(-1, 1, 1, 1) / 1000, 0.5 * x_t

    try:
        out = ddim.sample(eps_fn, x_T, 20, 5.0, 1.0, gen, progress=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 20 and out.device.type == "cuda" and out.dtype == torch.bfloat16


@cuda
def test_initial_noise_on_the_gpu_equals_diffusers():
    expected = randn_tensor((2, 4, 16, 16), generator=torch.Generator().manual_seed(5), device=torch.device("cuda"), dtype=torch.bfloat16)
    ours = ddim.randn((2, 4, 16, 16), torch.Generator().manual_seed(5), "cuda", torch.bfloat16)
    assert ours.device.type == "cuda" and torch.equal(ours, expected)
