"""Memory of a 1024 px SDXL image, counted on the meta device (no GPU, no weights needed).

Sampling must fit in 8 GiB of GPU memory. bench/bench.py measures it on a GPU; these
tests keep the arithmetic honest in CI: the models are built at the official shapes on the meta
device, where every operation computes shapes but no values, and `Allocations` below adds up the
bytes of every storage an operation creates and subtracts them when the storage is freed, as
the GPU's caching allocator's `max_memory_allocated` does (less its cuDNN workspaces and its
512-byte rounding). Weights exist before counting starts, so what is counted is the activations.

On meta, the fused attention kernels do not exist and PyTorch takes its math path; that is what
the GPU does for the VAE's 512-wide head too. The UNet's 64-wide heads go through FlashAttention
on a GPU, which allocates its output only: `flash_like_attention` stands in for it.
"""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import model.attention as A
from model import clip, speed, unet, vae

GiB = 2**30


class Allocations(TorchDispatchMode):
    """peak = the most bytes of storage created inside the block and alive at one time."""

    def __init__(self):
        super().__init__()
        self.now = self.peak = 0
        self.alive = set()  # ids of the storages counted and not yet freed

    def _freed(self, key, nbytes):
        self.now -= nbytes
        self.alive.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self.alive:  # a view, an in-place result, or counted already
                continue
            self.alive.add(key)
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._freed, key, storage.nbytes())
        return out


def weight_bytes(*modules):
    return sum(t.numel() * t.element_size() for m in modules for t in (*m.parameters(), *m.buffers()))


def flash_like_attention(q, k, v, **kwargs):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def on_meta(module):
    """A bfloat16 model with the memory-saving modules sample.py and train.py put in (model/speed.py)."""
    return speed.save_memory(module.to(torch.bfloat16).eval().requires_grad_(False))[0]


@pytest.fixture(scope="module")
def official():
    with torch.device("meta"):
        return dict(unet=on_meta(unet.UNet(unet.UNetConfig())), vae=on_meta(vae.AutoencoderKL(vae.VAEConfig())),
                    clip_l=on_meta(clip.CLIPTextModel(clip.CLIPTextConfig())),
                    clip_g=on_meta(clip.OpenCLIPTextModel(clip.OpenCLIPTextConfig())))


def test_the_counter_counts_what_is_alive_at_once():
    with torch.device("meta"), Allocations() as mem:
        a = torch.empty(1024, dtype=torch.float32)  # 4 KiB
        b = a.view(32, 32).t()  # a view: nothing new
        a.add_(1)  # in place: nothing new
        c = a * 2  # 4 KiB more: 8 alive
        del a, b, c
        d = torch.empty(512, dtype=torch.bfloat16)  # 1 KiB, after 8 KiB were freed
        del d
    assert mem.peak == 8192 and mem.now == 0


def decode_peak(official, px):
    z = torch.empty(1, 4, px // 8, px // 8, device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), Allocations() as mem:
        official["vae"].decode(z)
    return mem.peak


def test_a_1024_px_vae_decode_needs_at_most_1_3_gib_above_its_weights(official):
    """It was 2.5 GiB (2.2 counted here): the mid block's 16384 x 16384 attention scores in
    float32, twice, then float32 copies of whole 256-channel 1024 x 1024 activations in the
    GroupNorms. Left: the first full-resolution ResBlock's input, normalised input and output."""
    assert decode_peak(official, 1024) <= 1.3 * GiB


def test_a_whole_1024_px_image_fits_in_8_gib_on_paper(official, monkeypatch):
    """The four models' bfloat16 weights stay on the GPU all along; the largest activation peak
    is the VAE decode's, then the UNet step's (batch 2). The GPU adds workspaces this does not
    see (0.2 GiB on the H200 before), so 7.8 GiB is the line here."""
    weights = weight_bytes(*official.values())
    assert 6.4 * GiB < weights < 6.5 * GiB  # 3.47 B parameters in bfloat16
    decode = decode_peak(official, 1024)  # (before the UNet's attention is replaced)
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", flash_like_attention)
    with torch.device("meta"), torch.no_grad():
        x = torch.empty(2, 4, 128, 128, dtype=torch.bfloat16)
        context, pooled = torch.empty(2, 77, 2048, dtype=torch.bfloat16), torch.empty(2, 1280, dtype=torch.bfloat16)
        with Allocations() as step:
            official["unet"](x, torch.tensor([999, 999]), context, pooled, torch.empty(2, 6, dtype=torch.bfloat16))
    peak = weights + max(step.peak, decode)
    assert step.peak < 0.5 * GiB
    assert peak <= 7.8 * GiB, f"{peak / GiB:.2f} GiB"


class FlashLikeAttention(torch.autograd.Function):
    """FlashAttention's memory with autograd: the output and a float32 log-sum-exp per query; the
    backward keeps q, k, v, the output and the log-sum-exp, and returns one gradient per input."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@pytest.mark.parametrize("checkpointing,limit", [(False, 20), (True, 8)], ids=["plain", "checkpointing"])
def test_a_1024_px_training_triplet_fits_its_memory_target_on_paper(official, monkeypatch, checkpointing, limit):
    """One CoCoIns triplet at 1024 px in at most 20 GiB, or 8 with gradient checkpointing:
    the 2 passes without gradients (batch 2), then the 3 with gradients to the conditioning (batch
    3) and their backward, the UNet frozen (bench.py's training step). It was 20.9 GiB on the H200
    (21.4 counted here): the GroupNorms kept float32 copies and the GEGLUs GELU(g) for the backward."""
    monkeypatch.setattr(A.F, "scaled_dot_product_attention", lambda q, k, v, **kw: FlashLikeAttention.apply(q, k, v))
    model = official["unet"]
    monkeypatch.setattr(model, "gradient_checkpointing", checkpointing)
    bf16 = dict(dtype=torch.bfloat16)
    with torch.device("meta"):
        x, t, ids = torch.empty(3, 4, 128, 128, **bf16), torch.tensor([10, 500, 990]), torch.empty(3, 6, **bf16)
        context = torch.empty(3, 77, 2048, **bf16, requires_grad=True)
        pooled = torch.empty(3, 1280, **bf16, requires_grad=True)
        with Allocations() as mem:
            with torch.no_grad():
                eps_free = model(x[:2], t[:2], context[:2], pooled[:2], ids[:2])
            eps = model(x, t, context, pooled, ids)
            loss = eps.float().square().mean() + (eps[:2].float() - eps_free.float()).square().mean()
            loss.backward()
    peak = weight_bytes(model) + mem.peak
    assert peak <= (limit - 1) * GiB, f"{peak / GiB:.2f} GiB"  # 1 GiB left for what the GPU adds
