"""The speed paths compute what the plain paths compute: --compile, --offload, and bench.py's sizes.

Compilation runs inductor on the CPU (gcc builds the kernels) on bench.py's tiny SDXL, whose
one-level UNet has three distinct compiled graphs, so this file stays near a minute even with
an empty compile cache. Speed itself is measured by bench.py on a GPU, never by a timed test.
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

import bench
from model import checkpoint, unet
from model.checkpoint import UserError
from model.checkpoint import PREFIX
from model.sdxl import CUDAGraphed, Offload, check_cuda_graphs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = bench.tiny_size()
PX = SIZE.image  # 64 px images: 8 x 8 latents
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models():
    return bench.build_ours(SIZE, CPU, torch.float32, seed=0)


@pytest.fixture(scope="module")
def reference_image(models):
    return bench.make_sdxl(models, CPU, torch.float32).generate("a woman reading", seed=3, steps=3, width=PX, height=PX)


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
    compiled = unet.compile_unet(bench.same_weights(models)["unet"], "regional")
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
    # `python bench.py --tiny` compiles it and compares it with eager)
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


@pytest.mark.parametrize("mode", unet.COMPILE_MODES)
def test_a_compiled_sampling_loop_does_not_recompile_after_its_first_step(models, reference_image, dynamo_only, mode):
    sdxl = bench.make_sdxl(bench.same_weights(models), CPU, torch.float32)
    sdxl.compile(mode)
    before = graphs_compiled()
    sdxl.generate("a woman reading", seed=3, steps=1, width=PX, height=PX)  # the first step compiles
    # full: the whole UNet and the VAE decoder, one graph each; regional: the UNet's 3 distinct blocks
    assert graphs_compiled() - before == {"full": 2, "regional": 3}[mode]
    before = graphs_compiled()
    # Every later step (a new timestep each time), prompt, seed and guidance scale must reuse
    # what the first step compiled; dynamo raises on any recompilation.
    with torch._dynamo.config.patch(error_on_recompile=True):
        image = sdxl.generate("a woman reading", seed=3, steps=3, width=PX, height=PX)
        sdxl.generate("a man surfing", seed=4, steps=4, guidance=7.5, width=PX, height=PX)
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
        assert lent.data_ptr() != host.data_ptr() and torch.equal(lent, host) and off.lent == {model: 1}
        with off.lend(model):  # nested: no second copy, and the inner block gives nothing back
            assert model.weight.data_ptr() == lent.data_ptr() and off.lent == {model: 2}
        assert model.weight.data_ptr() == lent.data_ptr()
    # back on the very same host memory: frozen weights are never copied back
    assert model.weight.data_ptr() == host.data_ptr() and off.lent == {}


def test_offload_has_only_the_running_model_on_the_device_and_gives_the_same_image(models, reference_image):
    sdxl = bench.make_sdxl(bench.same_weights(models), CPU, torch.float32)
    sdxl.enable_offload(CPU)
    on_device = {}  # model name -> the sets of lent models seen at its calls

    def record(name):
        return lambda module, args: on_device.setdefault(name, set()).add(frozenset(sdxl.offload.lent))

    for name, module in (("clip_l", sdxl.clip_l), ("clip_g", sdxl.clip_g), ("unet", sdxl.unet),
                         ("vae", sdxl.vae.decoder)):
        module.register_forward_pre_hook(record(name))
    image = sdxl.generate("a woman reading", seed=3, steps=3, width=PX, height=PX)
    text = {frozenset({sdxl.clip_l, sdxl.clip_g})}
    assert on_device == {"clip_l": text, "clip_g": text, "unet": {frozenset({sdxl.unet})},
                         "vae": {frozenset({sdxl.vae})}}
    assert sdxl.offload.lent == {}
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
    plain = sdxl.generate("a woman reading", seed=3, steps=4, width=PX, height=PX)
    sdxl.enable_cuda_graphs()
    for _ in range(2):
        image = sdxl.generate("a woman reading", seed=3, steps=4, width=PX, height=PX)
        assert np.abs(image.astype(int) - plain).max() <= 1
    assert len(sdxl.graphed_unet.graphs) == 1
    with pytest.raises(UserError, match="cannot be combined"):
        sdxl.enable_offload(cuda)


def test_guidance_1_runs_the_conditional_half_alone(models, monkeypatch):
    """ε̂ = ε_c at guidance 1: the UNet sees batch 1 and the negative prompt is never encoded,
    and the image is the one the two-half path would give (ε_u is not read there either)."""
    sdxl = bench.make_sdxl(models, CPU, torch.float32)
    kwargs = dict(seed=3, steps=2, guidance=1.0, width=PX, height=PX)
    plain = sdxl.generate("a woman reading", **kwargs)
    batches, encoded = [], []
    unet_forward, encode = type(sdxl.unet).forward, sdxl.encode_prompt
    monkeypatch.setattr(type(sdxl.unet), "forward", lambda self, x, *a: batches.append(len(x)) or unet_forward(self, x, *a))
    monkeypatch.setattr(sdxl, "encode_prompt", lambda prompts, *a: encoded.append(prompts) or encode(prompts, *a))
    image = sdxl.generate("a woman reading", negative_prompt="blurry", **kwargs)
    assert batches == [1, 1] and encoded == [["a woman reading"]]
    np.testing.assert_array_equal(image, plain)
