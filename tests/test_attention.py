"""model/attention.py: every backend that runs on this machine computes softmax(q·kᵀ/√D + mask)·v.

The reference path is itself checked against the formula evaluated in float64 here, so a bug
shared by the reference and the fused kernels cannot hide.
"""

from contextlib import nullcontext
import pytest
import torch

import model.attention as A


@pytest.fixture(autouse=True)
def _restore_backend():
    yield
    A.set_backend("auto")


def _runs_here(backend):
    A.set_backend(backend)
    try:
        q = torch.randn(1, 1, 4, 64)
        A.attention(q, q, q)
        return True
    except RuntimeError:
        return False
    finally:
        A.set_backend("auto")


# auto, math and reference run everywhere; the fused kernels only where PyTorch has them
# (flash has a CPU kernel; efficient and cudnn need CUDA).
BACKENDS_HERE = ["auto", "math", "reference"] + [b for b in ("flash", "efficient", "cudnn") if _runs_here(b)]


def formula(q, k, v, mask=None, is_causal=False):
    """softmax(q·kᵀ/√D + mask)·v in float64, written independently of model/attention.py."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / q.shape[-1] ** 0.5
    if is_causal:
        i = torch.arange(scores.shape[-2])[:, None]
        j = torch.arange(scores.shape[-1])[None, :]
        scores = torch.where(j > i, float("-inf"), scores)
    if mask is not None:
        scores = scores + mask.double()
    return torch.einsum("bhij,bhjd->bhid", scores.softmax(-1), v)


def qkv(B=2, heads=3, Lq=10, Lk=10, D=64):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, heads, Lq, D, generator=g), torch.randn(B, heads, Lk, D, generator=g),
            torch.randn(B, heads, Lk, D, generator=g))


def additive_mask(Lq, Lk):
    """Random finite biases plus -inf on a few keys (never a whole row), broadcast over batch and heads."""
    g = torch.Generator().manual_seed(1)
    mask = torch.randn(1, 1, Lq, Lk, generator=g)
    mask[..., 1::3] = float("-inf")
    return mask


CASES = {
    "self": dict(shape=dict(Lq=10, Lk=10), mask=False, is_causal=False),
    "cross": dict(shape=dict(Lq=16, Lk=7), mask=False, is_causal=False),
    "causal": dict(shape=dict(Lq=12, Lk=12), mask=False, is_causal=True),
    "additive_mask": dict(shape=dict(Lq=9, Lk=11), mask=True, is_causal=False),
}


def test_only_known_backends_are_accepted():
    assert set(BACKENDS_HERE) <= set(A.BACKENDS)
    with pytest.raises(ValueError):
        A.set_backend("fastest")


@pytest.mark.parametrize("case", CASES)
def test_reference_path_is_the_formula(case):
    c = CASES[case]
    q, k, v = qkv(**c["shape"])
    mask = additive_mask(q.shape[-2], k.shape[-2]) if c["mask"] else None
    out = A.attention_reference(q, k, v, mask, c["is_causal"])
    assert out.dtype == q.dtype
    assert torch.allclose(out.double(), formula(q, k, v, mask, c["is_causal"]), atol=1e-5)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_backend_agrees_with_the_reference_math(backend, case):
    c = CASES[case]
    q, k, v = qkv(**c["shape"])
    mask = additive_mask(q.shape[-2], k.shape[-2]) if c["mask"] else None
    A.set_backend(backend)
    out = A.attention(q, k, v, mask=mask, is_causal=c["is_causal"])
    assert out.shape == q.shape
    assert torch.allclose(out, A.attention_reference(q, k, v, mask, c["is_causal"]), atol=1e-5)


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn"])
def test_fused_kernels_are_never_forced_on_a_512_wide_head(monkeypatch, backend):
    # The SDXL VAE's mid attention has one 512-wide head; the fused kernels stop at 256
    # (forcing efficient or cudnn there fails with "No available kernel" on an H200).
    forced = []
    real = A.sdpa_kernel
    monkeypatch.setattr(A, "sdpa_kernel", lambda backends: forced.append(backends) or (real(backends) if backend == "flash" else nullcontext()))
    A.set_backend(backend)

    q, k, v = qkv(B=1, heads=1, Lq=16, Lk=16, D=512)
    out = A.attention(q, k, v)
    assert forced == [], "a 512-wide head must fall back to PyTorch's own choice, not be forced onto flash"
    assert torch.allclose(out, A.attention_reference(q, k, v), atol=1e-5)

    q, k, v = qkv(B=1, heads=1, Lq=16, Lk=16, D=64)
    A.attention(q, k, v)
    assert forced == [A._SDPA_BACKENDS[backend]], "64-wide heads do go to the chosen kernel"
