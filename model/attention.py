"""Attention, written once.

Every attention layer in this project (UNet, VAE, both text encoders) calls `attention()`.
It takes queries, keys and values shaped (B, heads, L, D) and computes

    softmax(q·kᵀ / √D + mask) · v

either through PyTorch's fused `scaled_dot_product_attention` (SDPA) with a chosen kernel,
or through `attention_reference`, the same formula written out in plain tensor math so a
reader can see exactly what the fused kernels compute (and tests can check them against it).

Backends (`--attention` on the command line):
    auto       let PyTorch pick the fastest kernel for each call (the default)
    flash      FlashAttention-2 (CUDA, fp16/bf16, head width <= 256)
    efficient  memory-efficient attention (xformers-style kernel)
    cudnn      cuDNN's fused attention (recent NVIDIA GPUs)
    math       PyTorch's unfused C++ implementation of SDPA
    reference  `attention_reference` below, plain Python/tensor ops

Read next: model/clip.py (the first user of this helper).
"""

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = ("auto", *_SDPA_BACKENDS, "reference")

# The fused kernels (flash, memory-efficient, cuDNN) only exist for head widths up to 256 on
# current GPUs. The SDXL VAE's mid block has a single 512-wide head, so that call must never
# be forced onto them: it falls back to PyTorch's own choice (the math kernel).
FUSED_MAX_HEAD_DIM = 256

_backend = "auto"


def set_backend(name: str) -> None:
    """Choose the attention backend used by every model from now on."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


def attention_reference(q, k, v, mask=None, is_causal=False):
    """softmax(q·kᵀ/√D + mask)·v in plain tensor math, computed in float32."""
    D = q.shape[-1]
    scores = (q.float() @ k.float().transpose(-1, -2)) / D**0.5  # (B, heads, Lq, Lk)
    if is_causal:
        Lq, Lk = scores.shape[-2:]
        future = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if mask is not None:
        scores = scores + mask.float()
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention(q, k, v, mask=None, is_causal=False):
    """Multi-head attention on (B, heads, L, D) tensors through the selected backend."""
    if _backend == "reference":
        return attention_reference(q, k, v, mask, is_causal)
    context = nullcontext()
    if _backend != "auto":
        # PITFALL: fused kernels take heads up to 256 wide; the VAE's 512-wide head falls back
        # to PyTorch's own choice instead of failing with "No available kernel".
        if _backend == "math" or q.shape[-1] <= FUSED_MAX_HEAD_DIM:
            context = sdpa_kernel(_SDPA_BACKENDS[_backend])
    with context:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
