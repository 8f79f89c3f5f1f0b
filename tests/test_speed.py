"""model/speed.py computes what the plain chapters compute: the memory-saving swaps, --compile,
--offload, --cuda-graphs, and bench.py's sizes.

Compilation runs inductor on the CPU (gcc builds the kernels) on bench.py's tiny SDXL, whose
one-level UNet has three distinct compiled graphs, so this file stays near a minute even with
an empty compile cache. Speed itself is measured by bench/bench.py on a GPU, never by a timed test.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch._dynamo.utils import counters

import model.attention as A
from bench import bench
from model import checkpoint, speed, unet, vae
from model.checkpoint import PREFIX
from model.errors import UserError
from model.speed import CUDAGraphed, Offload, check_cuda_graphs
from tests.test_attention import qkv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = bench.tiny_size()
PX = SIZE.image  # 64 px images: 8 x 8 latents
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models():
    return bench.build_ours(SIZE, CPU, torch.float32, seed=0)


@pytest.fixture(scope="module")
def reference_image(models):
    sdxl = bench.make_sdxl(models, CPU, torch.float32)
    return sdxl.generate(["a woman reading"], [3], steps=3, width=PX, height=PX)[0]


@pytest.fixture(scope="module")
def weights_file(models, tmp_path_factory):
    """The tiny models as an official-layout single file, for sample.py."""
    path = str(tmp_path_factory.mktemp("tiny") / "tiny.safetensors")
    save_file({PREFIX[name] + k: v.contiguous() for name, m in models.items() for k, v in m.state_dict().items()}, path)
    return path


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


def test_regional_compile_gives_the_eager_eps_and_compiles_each_distinct_block_once(models):
    inputs = bench.unet_inputs(SIZE, 2, PX, CPU, torch.float32)
    compiled = speed.compile_unet(bench.same_weights(models)["unet"], "regional")
    before = graphs_compiled()
    with torch.no_grad():
        eager, fast = models["unet"](*inputs), compiled(*inputs)
    torch.testing.assert_close(fast, eager, atol=1e-4, rtol=1e-4)
    # two ResBlock shapes (with and without the skip convolution) and one transformer block:
    # a graph per block object, or a graph break, would show as more
    assert graphs_compiled() - before == 3
    # the official UNet needs 12 versions of ResBlock.forward per image size, past dynamo's default 8
    assert torch._dynamo.config.recompile_limit >= 12
    # the compiled module keeps the official names: it still loads and saves checkpoints as is
    assert compiled.state_dict().keys() == models["unet"].state_dict().keys()


def test_the_whole_unet_traces_as_one_graph_as_compile_full_needs(models):
    # (dynamo's tracing only: inductor on the whole UNet takes half a minute on two cores;
    # `python -m bench.bench --tiny` compiles it and compares it with eager)
    inputs = bench.unet_inputs(SIZE, 2, PX, CPU, torch.float32, seed=1)
    with torch.no_grad():
        explanation = torch._dynamo.explain(models["unet"])(*inputs)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


@pytest.fixture
def dynamo_only(monkeypatch):
    """torch.compile with dynamo's tracing and guards, which decide every recompilation, but
    the eager backend instead of inductor's half-minute C++ builds of a whole UNet."""
    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, **kw, backend="eager"))


@pytest.mark.parametrize("mode", speed.COMPILE_MODES)
def test_a_compiled_sampling_loop_does_not_recompile_after_its_first_step(models, reference_image, dynamo_only, mode):
    sdxl = bench.make_sdxl(bench.same_weights(models), CPU, torch.float32)
    speed.compile(sdxl, mode)
    before = graphs_compiled()
    sdxl.generate(["a woman reading"], [3], steps=1, width=PX, height=PX)  # the first step compiles
    # full: the whole UNet and the VAE decoder, one graph each; regional: the UNet's 3 distinct blocks
    assert graphs_compiled() - before == {"full": 2, "regional": 3}[mode]
    before = graphs_compiled()
    # Every later step (a new timestep each time), prompt, seed and guidance scale must reuse
    # what the first step compiled; dynamo raises on any recompilation.
    with torch._dynamo.config.patch(error_on_recompile=True):
        image = sdxl.generate(["a woman reading"], [3], steps=3, width=PX, height=PX)[0]
        sdxl.generate(["a man surfing"], [4], steps=4, guidance=7.5, width=PX, height=PX)
        # bench.py's step inputs, and contiguous copies as CUDAGraphed records with, are the
        # sampling loop's dtypes and strides: the same compiled graph (guards include strides)
        inputs = bench.unet_inputs(SIZE, 2, PX, CPU, torch.float32)
        with torch.no_grad():
            sdxl.unet(*inputs)
            sdxl.unet(*[x.clone(memory_format=torch.contiguous_format) for x in inputs])
    assert graphs_compiled() == before
    assert np.abs(image.astype(int) - reference_image).max() <= 1


def test_offload_lends_a_copy_and_takes_back_the_host_tensors():
    model = torch.nn.Linear(3, 3)
    off = Offload(CPU)
    off.store(model)
    host = model.weight.data
    with off.lend(model):
        lent = model.weight.data
        # the model computes with a copy on the device (here the CPU, so: another tensor)
        assert lent.data_ptr() != host.data_ptr() and torch.equal(lent, host)
    # back on the very same host memory: frozen weights are never copied back
    assert model.weight.data_ptr() == host.data_ptr()


def test_offload_has_only_the_running_model_on_the_device_and_gives_the_same_image(models, reference_image):
    sdxl = bench.make_sdxl(bench.same_weights(models), CPU, torch.float32)
    speed.enable_offload(sdxl, CPU)
    everything = (sdxl.clip_l, sdxl.clip_g, sdxl.unet, sdxl.vae)
    host = {m: next(m.parameters()).data_ptr() for m in everything}  # where each waits between lends

    def lent():
        return frozenset(m for m in everything if next(m.parameters()).data_ptr() != host[m])

    on_device = {}  # model name -> the sets of lent models seen at its calls
    for name, module in (("clip_l", sdxl.clip_l), ("clip_g", sdxl.clip_g), ("unet", sdxl.unet),
                         ("vae", sdxl.vae.decoder)):
        module.register_forward_pre_hook(lambda module, args, name=name: on_device.setdefault(name, set()).add(lent()))
    image = sdxl.generate(["a woman reading"], [3], steps=3, width=PX, height=PX)[0]
    text = {frozenset({sdxl.clip_l, sdxl.clip_g})}
    assert on_device == {"clip_l": text, "clip_g": text, "unet": {frozenset({sdxl.unet})},
                         "vae": {frozenset({sdxl.vae})}}
    assert lent() == frozenset()
    assert reference_image.std() > 10  # a real image, not a flat one that anything flat would match
    np.testing.assert_array_equal(image, reference_image)


def run_sample(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("flag", [["--compile"], ["--offload"]], ids=["compile", "offload"])
def test_sample_py_flags_run_end_to_end_and_give_the_same_image(weights_file, reference_image, tmp_path, flag):
    out = tmp_path / "image.png"
    r = run_sample("--weights", weights_file, "--prompt", "a woman reading", "--seed", 3, "--steps", 3,
                   "--width", PX, "--height", PX, "--out", out, "--device", "cpu", *flag)
    assert r.returncode == 0, r.stderr
    image = np.asarray(Image.open(out).convert("RGB"))
    assert np.abs(image.astype(int) - reference_image).max() <= 1


@pytest.mark.parametrize("size", [bench.official_size(), SIZE], ids=["official", "tiny"])
def test_bench_sizes_describe_the_same_models_in_our_layout_and_diffusers(size):
    """bench.py builds ours from our configs alone, and from diffusers' modules with
    --vs-diffusers: both must be the same architecture."""
    with torch.device("meta"):
        theirs = _diffusers_on_meta(size)
    ours = {"clip_l": size.clip_l, "clip_g": size.clip_g, "unet": size.unet, "vae": size.vae}
    for name, module in theirs.items():
        shapes = {k: tuple(v.shape) for k, v in bench.FROM_DIFFUSERS[name](module.state_dict()).items()}
        assert checkpoint.config_from_shapes(name, shapes) == ours[name], name


def _diffusers_on_meta(size):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = size.diffusers
    return {"clip_l": CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
            "clip_g": CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])),
            "unet": UNet2DConditionModel(**cfg["unet"]), "vae": AutoencoderKL(**cfg["vae"])}


# --- CUDA graphs (--cuda-graphs): refused clearly here; replayed and compared on a GPU -------------


def test_cuda_graphs_are_refused_in_one_sentence_without_cuda_or_with_offload(weights_file, tmp_path):
    r = run_sample("--weights", weights_file, "--prompt", "a woman reading", "--steps", 1, "--width", PX,
                   "--height", PX, "--out", tmp_path / "x.png", "--device", "cpu", "--cuda-graphs")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "--cuda-graphs needs a CUDA GPU" in r.stderr and not (tmp_path / "x.png").exists()
    with pytest.raises(UserError, match="cannot be combined"):
        check_cuda_graphs("cuda", offload=True)
    check_cuda_graphs("cuda:0", offload=False)  # nothing to say


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@gpu
def test_gpu_cuda_graph_replays_compute_the_eager_step():
    """The replay runs the recorded kernels: the eager numbers (cuBLAS may pick another algorithm
    while recording, so within bfloat16 rounding rather than bit for bit)."""
    cuda = torch.device("cuda")
    model = bench.build_ours(SIZE, cuda, torch.bfloat16, seed=0)["unet"]
    graphed = CUDAGraphed(model)
    with torch.no_grad():
        for seed in (1, 2, 3):  # new inputs each call, through the same recording
            inputs = bench.unet_inputs(SIZE, 2, PX, cuda, torch.bfloat16, seed=seed)
            assert bench.rel_err(graphed(*inputs), model(*inputs)) < 2e-3
        held = graphed(*inputs)
        kept = held.clone()
        graphed(*bench.unet_inputs(SIZE, 2, PX, cuda, torch.bfloat16, seed=4))
        assert torch.equal(held, kept), "a replay overwrote an output the caller holds"
        graphed(*bench.unet_inputs(SIZE, 2, 2 * PX, cuda, torch.bfloat16))  # another size: another recording
    assert len(graphed.graphs) == 2


@gpu
def test_gpu_generate_with_cuda_graphs_gives_the_same_image():
    cuda = torch.device("cuda")
    models = bench.build_ours(SIZE, cuda, torch.bfloat16, seed=0)
    sdxl = bench.make_sdxl(models, cuda, torch.bfloat16)
    plain = sdxl.generate(["a woman reading"], [3], steps=4, width=PX, height=PX)[0]
    speed.enable_cuda_graphs(sdxl)
    for _ in range(2):
        image = sdxl.generate(["a woman reading"], [3], steps=4, width=PX, height=PX)[0]
        assert np.abs(image.astype(int) - plain).max() <= 1
    assert len(sdxl.graphed_unet.graphs) == 1
    with pytest.raises(UserError, match="cannot be combined"):
        speed.enable_offload(sdxl, cuda)


@gpu
def test_gpu_cuda_graphs_record_each_batch_shape_of_a_batched_generate():
    """Three images in batches of two: the UNet sees batches of 4 and then 2 (two halves each), so
    two graphs are recorded, and every image is the one the kernels launched one by one give."""
    cuda = torch.device("cuda")
    sdxl = bench.make_sdxl(bench.build_ours(SIZE, cuda, torch.bfloat16, seed=0), cuda, torch.bfloat16)
    prompts, seeds = ["a woman reading", "a man surfing", "a lighthouse at dawn"], [3, 4, 5]
    plain = sdxl.generate(prompts, seeds, steps=4, width=PX, height=PX, batch_size=2)
    speed.enable_cuda_graphs(sdxl)
    image = sdxl.generate(prompts, seeds, steps=4, width=PX, height=PX, batch_size=2)
    assert sorted(key[0][0][0] for key in sdxl.graphed_unet.graphs) == [2, 4]  # x_t's batch in each recording
    assert np.abs(image.astype(int) - plain).max() <= 1


def test_guidance_1_runs_the_conditional_half_alone(models, monkeypatch):
    """ε̂ = ε_c at guidance 1: the UNet sees batch 1 and the negative prompt is never encoded,
    and the image is the one the two-half path would give (ε_u is not read there either)."""
    sdxl = bench.make_sdxl(models, CPU, torch.float32)
    kwargs = dict(steps=2, guidance=1.0, width=PX, height=PX)
    plain = sdxl.generate(["a woman reading"], [3], **kwargs)
    batches, encoded = [], []
    unet_forward, encode = type(sdxl.unet).forward, sdxl.encode_prompt
    monkeypatch.setattr(type(sdxl.unet), "forward", lambda self, x, *a: batches.append(len(x)) or unet_forward(self, x, *a))
    monkeypatch.setattr(sdxl, "encode_prompt", lambda prompts, *a: encoded.append(prompts) or encode(prompts, *a))
    image = sdxl.generate(["a woman reading"], [3], negative_prompt="blurry", **kwargs)
    assert batches == [1, 1] and encoded == [["a woman reading"]]
    np.testing.assert_array_equal(image, plain)


# ----------------------------------------------------------------------------------------------
# The memory-saving swaps (speed.save_memory), each against the plain module
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_save_memory_gives_the_plain_unet_and_vae_numbers(grad):
    """Every swap at once, on bench.py's tiny models in float32: the same ε̂ and image (and the
    same gradient to the conditioning, as training takes it)."""
    plain = {name: checkpoint.build(name, m.state_dict()) for name, m in bench.build_ours(SIZE, CPU, torch.float32).items()}
    lean = {name: speed.save_memory(checkpoint.build(name, m.state_dict()))[0] for name, m in plain.items()}
    assert type(lean["vae"].decoder.mid.attn_1) is speed.LeanAttnBlock and type(plain["vae"].decoder.mid.attn_1) is vae.AttnBlock
    x, t, context, pooled, time_ids = bench.unet_inputs(SIZE, 2, PX, CPU, torch.float32)
    z = torch.randn(1, 4, PX // 8, PX // 8, generator=torch.Generator().manual_seed(0))
    out = {}
    for name, models in (("plain", plain), ("lean", lean)):
        c = context.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            eps = models["unet"](x, t, c, pooled, time_ids)
            image = models["vae"].decode(z)
        if grad:
            eps.square().mean().backward()
        out[name] = (eps.detach(), image.detach(), c.grad)
    torch.testing.assert_close(out["lean"][0], out["plain"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["lean"][1], out["plain"][1], atol=1e-5, rtol=1e-5)
    if grad:
        torch.testing.assert_close(out["lean"][2], out["plain"][2], atol=1e-6, rtol=1e-4)


def _norm(groups=32, channels=64, eps=1e-5, seed=0, lean=True):
    g = torch.Generator().manual_seed(seed)
    norm = unet.GroupNorm32(groups, channels, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(channels, generator=g))
        norm.bias.copy_(0.1 * torch.randn(channels, generator=g))
    return speed.save_memory(norm)[0] if lean else norm


def _one_bf16_rounding(y, expected):
    """y is `expected` (float32) rounded once to bfloat16: at most half a bf16 step (2^-8 relative)
    off, and off by a whole step nowhere (statistics summed in another order may tip a value
    that sits on a rounding boundary, never further)."""
    err = (y.float() - expected).abs()
    step = 2.0**-7 * expected.abs().clamp_min(1e-30)
    return bool((err <= step).all())


@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
def test_group_norm_computes_in_float32_when_the_model_runs_in_bfloat16(lean):
    norm = _norm(lean=lean)
    # A large common offset is where low-precision statistics go wrong: a bfloat16 mean near 50
    # is off by up to 0.125, an eighth of the standard deviation.
    x = (50 + torch.randn(2, 64, 8, 8, generator=torch.Generator().manual_seed(1))).bfloat16()
    w, b = norm.weight.bfloat16().float(), norm.bias.bfloat16().float()
    expected = torch.nn.functional.group_norm(x.float(), 32, w, b, 1e-5)
    with torch.no_grad():
        y = norm.bfloat16()(x)
    assert y.dtype == torch.bfloat16
    assert _one_bf16_rounding(y, expected)
    # the check catches statistics kept in bfloat16
    var16, mean16 = torch.var_mean(x.reshape(2, 32, -1), dim=-1, correction=0, keepdim=True)
    sloppy = ((x.reshape(2, 32, -1) - mean16) * torch.rsqrt(var16 + 1e-5)).reshape(x.shape)
    sloppy = (sloppy.float() * w[:, None, None] + b[:, None, None]).bfloat16()
    assert not _one_bf16_rounding(sloppy, expected)


@pytest.mark.parametrize("lean", [False, True], ids=["plain", "lean"])
def test_group_norm_in_float32_is_pytorchs_group_norm(lean):
    norm = _norm(eps=1e-6, lean=lean)
    x = torch.randn(3, 64, 5, 7)
    expected = torch.nn.functional.group_norm(x, 32, norm.weight, norm.bias, 1e-6)
    assert torch.allclose(norm(x), expected, atol=1e-5)
    # any rank: (B, C, L) as well as (B, C, H, W)
    x3 = torch.randn(2, 64, 9)
    assert torch.allclose(norm(x3), torch.nn.functional.group_norm(x3, 32, norm.weight, norm.bias, 1e-6), atol=1e-5)


class _Float32Copies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the number of elements of every float32 tensor made by a dtype cast."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and out.dtype == torch.float32:
            self.sizes.append(out.numel())
        return out


def test_group_norm_copies_a_bfloat16_activation_to_float32_a_few_groups_at_a_time(monkeypatch):
    """The VAE's full-resolution activations are 1 GiB in float32: they are never copied whole,
    and the chunked statistics are the statistics of the whole."""
    norm = _norm().bfloat16()
    x = (3 + torch.randn(2, 64, 16, 16, generator=torch.Generator().manual_seed(2))).bfloat16()
    with torch.no_grad():
        whole = norm(x)  # 2·64·256 = 32768 values, under GROUP_NORM_CHUNK: one copy
        monkeypatch.setattr(speed, "GROUP_NORM_CHUNK", 2 * 2 * 256 * 3)  # 3 groups of 2 channels per copy
        with _Float32Copies() as copies:
            chunked = norm(x)
    assert torch.equal(chunked, whole)
    big = [n for n in copies.sizes if n > 64]  # (the weight and bias casts are 64 values)
    assert len(big) == 11 and max(big) <= speed.GROUP_NORM_CHUNK  # ceil(32 / 3) copies


def _saved_during(fn):
    """(dtype, numel) of every tensor autograd saves for the backward while `fn` runs."""
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def test_group_norm_gradients_are_pytorchs_in_float64():
    norm = _norm(eps=1e-6).double()
    x = (5 + torch.randn(2, 64, 6, 6, dtype=torch.float64)).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = norm.weight.detach().clone().requires_grad_(True)
    b_ref = norm.bias.detach().clone().requires_grad_(True)
    y = norm(x)
    y_ref = torch.nn.functional.group_norm(x_ref, 32, w_ref, b_ref, 1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    for ours, ref in ((y, y_ref), (x.grad, x_ref.grad), (norm.weight.grad, w_ref.grad), (norm.bias.grad, b_ref.grad)):
        assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9)


def test_group_norm_training_keeps_the_bfloat16_input_not_a_float32_copy():
    """Training backpropagates through the UNet's norms in bfloat16 (to the conditioning): the
    backward keeps x in bfloat16 (autograd through the float32 statistics would keep a float32
    copy, 2.4 GiB of a 1024 px triplet) and its gradients are those of float32."""
    norm = _norm().bfloat16()
    x16 = (2 + torch.randn(2, 64, 4, 4, generator=torch.Generator().manual_seed(3))).bfloat16().requires_grad_(True)
    y16, saved = _saved_during(lambda: norm(x16))
    assert (torch.bfloat16, x16.numel()) in saved
    assert not [n for dtype, n in saved if dtype == torch.float32 and n >= x16.numel()]
    x32 = x16.detach().float().requires_grad_(True)
    y32 = torch.nn.functional.group_norm(x32, 32, norm.weight.float(), norm.bias.float(), 1e-5)
    assert _one_bf16_rounding(y16, y32.detach())
    g = torch.randn_like(y32)
    y16.backward(g.bfloat16())
    y32.backward(g)
    assert x16.grad.dtype == torch.bfloat16 and norm.weight.grad.dtype == torch.bfloat16
    assert _rel_err(x16.grad, x32.grad) < 0.01


def _rel_err(a, ref):
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_geglu_training_recomputes_gelu_and_gives_autograds_gradient_bit_for_bit(dtype):
    """GEGLU keeps only [a, g] for the backward and recomputes GELU(g) there (plain autograd keeps
    GELU(g) as well, the MLP's widest tensor): the same gradient, to the bit."""
    geglu = speed.save_memory(unet.GEGLU(16, 32).to(dtype).requires_grad_(False))[0]
    x = torch.randn(2, 5, 16, dtype=dtype, requires_grad=True)
    out, saved = _saved_during(lambda: geglu(x))
    sizes = [n for _, n in saved]  # (the projection's weight is saved too, by the Linear)
    assert 2 * 5 * 64 in sizes and 2 * 5 * 32 not in sizes  # h = [a, g]; nothing of GELU(g)'s size
    x_ref = x.detach().clone().requires_grad_(True)
    a, gate = geglu.proj(x_ref).chunk(2, dim=-1)
    ref = a * torch.nn.functional.gelu(gate)
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(out, ref) and torch.equal(x.grad, x_ref.grad)


def _count_sdpa_calls(monkeypatch):
    calls = []
    real = A.F.scaled_dot_product_attention
    monkeypatch.setattr(A.F, "scaled_dot_product_attention",
                        lambda q, *a, **kw: calls.append(q.shape[-2]) or real(q, *a, **kw))
    return calls


@pytest.mark.parametrize("backend,D", [("auto", 320), ("math", 64), ("reference", 64), ("flash", 320)])
def test_unfused_calls_run_over_chunks_of_queries_with_the_same_result(monkeypatch, backend, D):
    """Unfused paths hold the whole (Lq, Lk) score matrix: 2 GiB for the VAE's 1024 px mid block.
    Past speed.MAX_SCORE_BYTES they run over chunks of queries, computing the same numbers."""
    q, k, v = qkv(B=1, heads=2, Lq=50, Lk=40, D=D)
    A.set_backend(backend)
    whole = A.attention(q, k, v)
    monkeypatch.setattr(speed, "MAX_SCORE_BYTES", 4 * 2 * 40 * 16)  # 16 queries per chunk
    calls = _count_sdpa_calls(monkeypatch)
    chunked = speed.attention_in_chunks(q, k, v)
    if backend != "reference":
        assert calls == [16, 16, 16, 2]
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert torch.allclose(chunked, A.attention_reference(q, k, v), atol=1e-5)


def test_fused_calls_are_never_chunked(monkeypatch):
    monkeypatch.setattr(speed, "MAX_SCORE_BYTES", 64)
    calls = _count_sdpa_calls(monkeypatch)
    speed.attention_in_chunks(*qkv(B=1, heads=2, Lq=30, Lk=30, D=64))  # auto, 64-wide: no score matrix held
    assert calls == [30]


def test_chunked_attention_compiles_as_one_graph(monkeypatch):
    """`--compile full` compiles the VAE decoder with fullgraph=True: the chunk loop must trace."""
    monkeypatch.setattr(speed, "MAX_SCORE_BYTES", 4 * 1 * 40 * 16)  # 16 queries per chunk
    q, k, v = qkv(B=1, heads=1, Lq=40, Lk=40, D=320)
    compiled = torch.compile(lambda q, k, v: speed.attention_in_chunks(q, k, v) * 2, fullgraph=True, dynamic=False)
    assert torch.allclose(compiled(q, k, v), 2 * A.attention_reference(q, k, v), atol=1e-5)
