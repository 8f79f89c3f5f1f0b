"""Speed and memory: swaps that replace or wrap the chapters' modules when asked.

The chapters compute SDXL in plain PyTorch. Everything here computes the same numbers faster
or in less memory, and is put in by the commands, never by a chapter:

    save_memory(*models)   the memory-saving versions of GroupNorm, GEGLU, the VAE's ResNet
                           block and attention (sample.py, eval.py, train.py, bench.py: always)
    compile(model, mode)   torch.compile, regional or full (--compile)
    enable_cuda_graphs     replay a recorded CUDA graph of the UNet step (--cuda-graphs)
    enable_offload         models in host memory, lent to the GPU while they run (--offload)

`save_memory` swaps a module's class for a subclass of it, so parameters, names and checkpoints
stay as they are; each swap is tested equal to the plain module (tests/test_speed.py), as
`attention_reference` is tested against SDPA.

Read next: bench/README.md (how the speed and memory are measured).
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from model import unet as unet_lib
from model import vae as vae_lib
from model.attention import FUSED_MAX_HEAD_DIM, attention, get_backend
from model.errors import UserError

# ----------------------------------------------------------------------------------------------
# GroupNorm in float32 without float32 copies of whole activations
# ----------------------------------------------------------------------------------------------

# A bfloat16 activation's float32 copy takes at most this many elements at a time (256 MiB):
# the VAE's full-resolution GroupNorms see 256 x 1024 x 1024 values, 1 GiB in float32.
GROUP_NORM_CHUNK = 2**26


def group_norm_stats(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, mean) of each (sample, group), shaped (B, G, 1), in float32 (float64 for float64 x)."""
    B, acc = x.shape[0], torch.promote_types(x.dtype, torch.float32)
    xg = x.reshape(B * groups, -1)  # one row per (sample, group)
    # From float32 copies of a few groups at a time, so a 1024 px VAE activation is never copied
    # whole. Not F.group_norm: its statistics kernel runs one thread block per (sample, group),
    # 32 blocks for one image on a 132-SM GPU; var_mean spreads a group over the whole GPU
    # (bf16 1024 px VAE decode on one H200: 104 ms with F.group_norm, 64 ms with this).
    rows = len(xg) if x.dtype == acc else max(1, GROUP_NORM_CHUNK // xg.shape[1])
    stats = [torch.var_mean(xg[i : i + rows].to(acc), dim=-1, correction=0, keepdim=True)
             for i in range(0, len(xg), rows)]
    var, mean = stats[0] if len(stats) == 1 else (torch.cat([v for v, _ in stats]), torch.cat([m for _, m in stats]))
    return var.view(B, groups, 1), mean.view(B, groups, 1)


def normalize(x, var, mean, weight, bias, eps, rounded_on_write: bool):
    """y = x·a + b per channel, a = γ/√(σ² + ε), b = β − μ·a: one multiply-add per element,
    in float32 (a bfloat16 x is promoted), rounded once to x's dtype."""
    B, C, G = x.shape[0], x.shape[1], var.shape[1]
    a = weight.to(var.dtype).view(1, G, C // G) * torch.rsqrt(var + eps)  # (B, G, C/G)
    b = bias.to(var.dtype).view(1, G, C // G) - mean * a
    shape = (B, C) + (1,) * (x.ndim - 2)
    a, b = a.reshape(shape), b.reshape(shape)
    if x.dtype == var.dtype or not rounded_on_write:
        return torch.addcmul(b, x, a).to(x.dtype)
    # rounded as it is written (on a GPU, inside the kernel), never held whole in float32
    return torch.addcmul(b, x, a, out=torch.empty_like(x))


class LeanGroupNorm(unet_lib.GroupNorm32):
    """GroupNorm32 with chunked float32 statistics, and a backward that keeps x in its own dtype."""

    def forward(self, x):
        if torch.compiler.is_compiling():  # the plain formula: inductor fuses it, and chooses what to keep
            return normalize(x, *group_norm_stats(x, self.num_groups), self.weight, self.bias, self.eps, False)
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad or self.bias.requires_grad):
            return _GroupNormFunction.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return normalize(x, *group_norm_stats(x, self.num_groups), self.weight, self.bias, self.eps, True)


class _GroupNormFunction(torch.autograd.Function):
    """Saves x as it is (bfloat16) and the statistics, where autograd through var_mean would save
    the float32 copy, twice the bytes: 2.4 GiB of a 1024 px CoCoIns training step. The backward
    is PyTorch's own group-norm gradient, run in float32."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        var, mean = group_norm_stats(x, groups)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + eps))
        ctx.groups = groups
        return normalize(x, var, mean, weight, bias, eps, rounded_on_write=True)

    @staticmethod
    @torch.autograd.function.once_differentiable  # (PyTorch's group-norm gradient has no gradient itself)
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        B, C, acc = x.shape[0], x.shape[1], mean.dtype
        dx, dweight, dbias = torch.ops.aten.native_group_norm_backward(
            grad.to(acc).contiguous(), x.to(acc).contiguous(), mean.reshape(B, -1), rstd.reshape(B, -1),
            weight.to(acc), B, C, x[0, 0].numel(), ctx.groups,  # N, C, H·W, groups
            [True, *ctx.needs_input_grad[1:3]])  # which of dx, dweight, dbias to compute
        return (dx.to(x.dtype),
                None if dweight is None else dweight.to(weight.dtype),
                None if dbias is None else dbias.to(weight.dtype), None, None)


# ----------------------------------------------------------------------------------------------
# GEGLU that recomputes GELU(g) in the backward
# ----------------------------------------------------------------------------------------------

class LeanGEGLU(unet_lib.GEGLU):
    def forward(self, x):
        h = self.proj(x)
        if torch.is_grad_enabled() and h.requires_grad and not torch.compiler.is_compiling():
            return _GEGLUFunction.apply(h)
        a, gate = h.chunk(2, dim=-1)
        return a * F.gelu(gate)


class _GEGLUFunction(torch.autograd.Function):
    """a ⊙ GELU(g), keeping only [a, g] (which the backward needs anyway) and recomputing GELU(g)
    in the backward: plain autograd would also keep GELU(g), the MLP's widest tensor (2.3 GiB of
    a 1024 px CoCoIns training step)."""

    @staticmethod
    def forward(ctx, h):
        ctx.save_for_backward(h)
        a, gate = h.chunk(2, dim=-1)
        return a * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        a, gate = h.chunk(2, dim=-1)
        # d/da = GELU(g);  d/dg = a · GELU'(g)  (PyTorch's own GELU derivative)
        return torch.cat([grad * F.gelu(gate), torch.ops.aten.gelu_backward(grad * a, gate)], dim=-1)


# ----------------------------------------------------------------------------------------------
# Attention over chunks of queries, where the score matrix is materialised
# ----------------------------------------------------------------------------------------------

# The unfused paths (math and reference) materialise the (Lq, Lk) score matrix, in float32 even
# for bfloat16 inputs, twice over (scores and their softmax). For the VAE's mid block at 1024 px
# (one head, 128·128 = 16384 positions) that is 1 GiB each, the peak of a whole SDXL image
# (2.2 of the VAE decode's 2.5 GiB on one H200). Softmax rows are independent, so such calls run
# over chunks of queries whose score matrix stays under this many bytes: the same numbers,
# a quarter of a GiB at most.
MAX_SCORE_BYTES = 2**28


def attention_in_chunks(q, k, v):
    """attention(q, k, v), over chunks of queries when the backend materialises the scores."""
    B, H, Lq, D = q.shape
    rows = max(1, MAX_SCORE_BYTES // (4 * B * H * k.shape[-2]))  # queries per chunk
    if (get_backend() not in ("math", "reference") and D <= FUSED_MAX_HEAD_DIM) or Lq <= rows:
        return attention(q, k, v)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for i in range(0, Lq, rows):
        out[:, :, i : i + rows] = attention(q[:, :, i : i + rows], k, v)
    return out


class LeanCrossAttention(unet_lib.CrossAttention):
    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2)
                   for z in (self.to_q(x), self.to_k(context), self.to_v(context)))
        return self.to_out(attention_in_chunks(q, k, v).transpose(1, 2).flatten(2))


class LeanAttnBlock(vae_lib.AttnBlock):
    def forward(self, x):
        h = self.norm(x)
        B, C, H, W = x.shape
        q, k, v = (t(h).reshape(B, 1, C, H * W).transpose(-1, -2).contiguous() for t in (self.q, self.k, self.v))
        h = attention_in_chunks(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


# ----------------------------------------------------------------------------------------------
# The VAE's ResNet block in place
# ----------------------------------------------------------------------------------------------

class LeanResnetBlock(vae_lib.ResnetBlock):
    """Without autograd (decoding, encoding for the latent cache) silu and the skip addition run
    in place on fresh outputs, and each intermediate is dropped as soon as it is used: a 1024 px
    activation is 0.25–0.5 GiB, and this keeps the decode's peak at about 1.2 GiB above the
    weights instead of 2.5."""

    def forward(self, x):
        if torch.is_grad_enabled():
            return super().forward(x)
        h = F.silu(self.norm2(self.conv1(F.silu(self.norm1(x), inplace=True))), inplace=True)
        h = self.conv2(h)
        return h.add_(x if self.nin_shortcut is None else self.nin_shortcut(x))


LEAN = {unet_lib.GroupNorm32: LeanGroupNorm, unet_lib.GEGLU: LeanGEGLU, unet_lib.CrossAttention: LeanCrossAttention,
        vae_lib.AttnBlock: LeanAttnBlock, vae_lib.ResnetBlock: LeanResnetBlock}


def save_memory(*models):
    """Give every module of `models` its memory-saving class (same parameters, same numbers)."""
    for model in models:
        for module in model.modules():
            module.__class__ = LEAN.get(type(module), type(module))
    return models


# ----------------------------------------------------------------------------------------------
# torch.compile (--compile)
# ----------------------------------------------------------------------------------------------

COMPILE_MODES = ("regional", "full")


def compile_unet(unet: unet_lib.UNet, mode: str = "regional") -> unet_lib.UNet:
    """torch.compile the UNet in place (same object, same parameter names) and return it.

    regional  every BasicTransformerBlock and every ResBlock is compiled on its own. The 70
              transformer blocks of SDXL share two compiled graphs (one per width), the 22
              ResBlocks twelve (one per input/output width and resolution): small graphs,
              compiled in seconds, so the first image comes quickly. The rest of the UNet
              (embeddings, norms around the transformers, up/downsampling) stays eager.
    full      the whole forward pass as one graph: the most fusion, the longest compilation.

    Shapes are static: each image size and batch compiles once, and a new size compiles anew
    instead of switching to slower shape-generic kernels. The timestep reaches the UNet as a
    tensor, so the steps of a sampling loop never recompile (tests/test_speed.py fails on it)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    # PITFALL: dynamo keeps at most `recompile_limit` (8) compiled versions of one function;
    # past that, with fullgraph=True, it raises. Regional compilation of SDXL needs twelve
    # versions of ResBlock.forward per image size and batch, so the limit is raised.
    # (`cache_size_limit` before PyTorch 2.7)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
    if mode == "full":
        unet.compile(dynamic=False, fullgraph=True)
        return unet
    for module in unet.modules():
        if isinstance(module, (unet_lib.BasicTransformerBlock, unet_lib.ResBlock)):
            module.compile(dynamic=False, fullgraph=True)
    return unet


def compile(model, mode: str = "regional"):
    """--compile: torch.compile an SDXL's UNet; `full` also compiles the VAE decoder (one graph;
    64 -> 36 ms per 1024 px decode on one H200, 31 s to compile)."""
    compile_unet(model.unet, mode)
    if mode == "full":
        model.vae.decoder.compile(dynamic=False, fullgraph=True)


# ----------------------------------------------------------------------------------------------
# Offloading (--offload): the models wait in host memory and visit the GPU one at a time
# ----------------------------------------------------------------------------------------------

class Offload:
    """Keeps models in host memory and lends each to `device` only while it runs.

    SDXL's four models hold 6.9 GB in bfloat16, but an image needs them one after another
    (text encoders, then the UNet at every step, then the VAE), so a GPU that holds the UNet
    and its activations is enough. Lending copies a model's tensors to the device (always a
    copy, on a CPU too: the host tensors are never the ones computed with); giving it back
    points the parameters at their host copies again. The models are frozen, so nothing is
    ever copied back. On CUDA the host copies are pinned (page-locked): the copies then run at
    full PCIe speed, with no staging buffer."""

    def __init__(self, device):
        self.device = torch.device(device)

    @staticmethod
    def _tensors(model):
        return [*model.parameters(), *model.buffers()]

    def store(self, model):
        """Move `model` to host memory, where it waits between lends."""
        pin = self.device.type == "cuda"
        for t in self._tensors(model):
            t.data = t.data.cpu().pin_memory() if pin else t.data.cpu()

    @contextmanager
    def lend(self, *models):
        """Run the block with `models` on the device."""
        host = {m: [t.data for t in self._tensors(m)] for m in models}
        try:
            for m in models:
                for t in self._tensors(m):
                    t.data = t.data.to(self.device, non_blocking=True, copy=True)
            yield
        finally:
            for m in models:
                for t, on_host in zip(self._tensors(m), host[m]):
                    t.data = on_host


def enable_offload(model, device):
    """--offload: keep an SDXL's models in host memory and lend each to `device` only while it runs."""
    if model.graphed_unet:
        check_cuda_graphs(device, offload=True)
    model.device = torch.device(device)
    model.offload = Offload(model.device)
    for m in (model.clip_l, model.clip_g, model.unet, model.vae):
        model.offload.store(m)


# ----------------------------------------------------------------------------------------------
# CUDA graphs (--cuda-graphs): a UNet step replayed from one recording
# ----------------------------------------------------------------------------------------------

def check_cuda_graphs(device, offload: bool) -> None:
    """--cuda-graphs' requirements, as one sentence each."""
    if torch.device(device).type != "cuda":
        raise UserError(f"--cuda-graphs needs a CUDA GPU, and this run is on {torch.device(device).type}; drop the flag")
    if offload:
        raise UserError("--cuda-graphs and --offload cannot be combined: a CUDA graph keeps the addresses of the "
                        "weights it recorded, and offloading moves them; choose one")


class CUDAGraphed:
    """Calls `module` by replaying a CUDA graph of one call instead of launching its kernels.

    A UNet step launches a few thousand kernels, each costing the CPU microseconds of Python and
    driver work; when that adds up to more than the GPU's work, the GPU waits. A CUDA graph
    records the launches of one call and replays them all with one. The recording fixes every
    address, so inputs are copied into the recorded input buffers before each replay and the
    output is copied out of the recorded one after it (the next replay overwrites it). Each
    input shape (image size, batch) is recorded once, on its first call.

    For inference only (calls with autograd on go straight to the module), with the weights
    staying where they are (not with Offload, which moves them)."""

    def __init__(self, module):
        self.module = module
        self.graphs = {}  # input shapes and dtypes -> (graph, input buffers, output buffer)

    def __call__(self, *inputs):
        if torch.is_grad_enabled():
            return self.module(*inputs)
        key = tuple((x.shape, x.dtype) for x in inputs)
        # (on the inputs' GPU, which need not be the current one: --device cuda:1)
        with torch.cuda.device(inputs[0].device):
            if key not in self.graphs:
                self.graphs[key] = self._record(inputs)
            graph, buffers, output = self.graphs[key]
            for buffer, x in zip(buffers, inputs):
                buffer.copy_(x)
            graph.replay()
            return output.clone()

    def _record(self, inputs):
        buffers = [x.clone(memory_format=torch.contiguous_format) for x in inputs]
        # Warm-up on a side stream (PyTorch's recipe): lazy initialisation (cuBLAS handles,
        # torch.compile's compilation, the allocator's first blocks) must not be recorded.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.module(*buffers)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = self.module(*buffers)
        return graph, buffers, output


def enable_cuda_graphs(model):
    """--cuda-graphs: an SDXL's generate() replays a CUDA graph of the UNet step (see CUDAGraphed)."""
    check_cuda_graphs(model.device, offload=model.offload is not None)
    model.graphed_unet = CUDAGraphed(model.unet)
