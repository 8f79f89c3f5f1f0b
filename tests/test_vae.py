"""model/vae.py against diffusers' AutoencoderKL and the official SDXL key layout."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersVAE
from safetensors.torch import save_file

from model import vae
from model import checkpoint
from model.checkpoint import CheckpointError, read_shapes, stream_tensors
from model.errors import UserError

KEYS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "sdxl_keys.json")))
PREFIX = "first_stage_model."
DIFFUSERS_FILE = "vae/diffusion_pytorch_model.safetensors"

# Scaled-down SDXL topology: three levels (two downsamples), two ResNets per encoder level,
# 4 latent channels, GroupNorm(32), single-head mid attention (64 wide here, 512 in SDXL).
TINY = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)


def official_state_dict(ref: DiffusersVAE) -> dict[str, torch.Tensor]:
    """The official (sgm) names for a diffusers AutoencoderKL, written module by module from the
    sgm layout, independently of model/checkpoint.py's regex rules."""
    modules = {"quant_conv": ref.quant_conv, "post_quant_conv": ref.post_quant_conv}
    resnets = {}
    for part in ("encoder", "decoder"):
        p = getattr(ref, part)
        modules[f"{part}.conv_in"] = p.conv_in
        modules[f"{part}.norm_out"] = p.conv_norm_out
        modules[f"{part}.conv_out"] = p.conv_out
        resnets[f"{part}.mid.block_1"] = p.mid_block.resnets[0]
        resnets[f"{part}.mid.block_2"] = p.mid_block.resnets[1]
        a = p.mid_block.attentions[0]
        modules.update({f"{part}.mid.attn_1.norm": a.group_norm, f"{part}.mid.attn_1.q": a.to_q,
                        f"{part}.mid.attn_1.k": a.to_k, f"{part}.mid.attn_1.v": a.to_v,
                        f"{part}.mid.attn_1.proj_out": a.to_out[0]})
    levels = len(ref.encoder.down_blocks)
    for i, block in enumerate(ref.encoder.down_blocks):
        resnets.update({f"encoder.down.{i}.block.{j}": r for j, r in enumerate(block.resnets)})
        if block.downsamplers:
            modules[f"encoder.down.{i}.downsample.conv"] = block.downsamplers[0].conv
    # sgm's decoder.up.N is numbered by resolution (N=0 is full size), diffusers' by execution order
    for i, block in enumerate(ref.decoder.up_blocks):
        n = levels - 1 - i
        resnets.update({f"decoder.up.{n}.block.{j}": r for j, r in enumerate(block.resnets)})
        if block.upsamplers:
            modules[f"decoder.up.{n}.upsample.conv"] = block.upsamplers[0].conv
    for name, r in resnets.items():
        for sub in ("norm1", "conv1", "norm2", "conv2"):
            modules[f"{name}.{sub}"] = getattr(r, sub)
        if r.conv_shortcut is not None:
            modules[f"{name}.nin_shortcut"] = r.conv_shortcut
    sd = {}
    for name, m in modules.items():
        for p in ("weight", "bias"):
            t = getattr(m, p).detach()
            # sgm's attention projections are 1x1 convs, diffusers' are Linear
            sd[f"{name}.{p}"] = t[:, :, None, None] if t.ndim == 2 else t
    return sd


def rel_err(ours, ref):
    return ((ours.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny diffusers VAE with random weights (biases and norm affines too), saved in both layouts."""
    torch.manual_seed(0)
    ref = DiffusersVAE(**TINY).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif p.ndim == 1:  # GroupNorm scale
                p.normal_(1, 0.2)
    d = tmp_path_factory.mktemp("vae")
    diffusers_path, official_path = str(d / "diffusers.safetensors"), str(d / "official.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, diffusers_path)
    save_file({PREFIX + k: v.contiguous() for k, v in official_state_dict(ref).items()}, official_path)
    return ref, diffusers_path, official_path


def load_diffusers(path, dtype=None):
    return checkpoint.build("vae", checkpoint.from_diffusers("vae", dict(stream_tensors(path, read_shapes(path), dtype=dtype))))


def load_official(path, dtype=None):
    return checkpoint.build("vae", dict(stream_tensors(path, read_shapes(path), dtype=dtype, strip_prefix=PREFIX)))


@pytest.mark.parametrize("layout", ["diffusers", "official"])
def test_encode_and_decode_match_diffusers_in_both_layouts(tiny, layout):
    ref, diffusers_path, official_path = tiny
    model = load_diffusers(diffusers_path) if layout == "diffusers" else load_official(official_path)
    # the second image and latent are nearly flat: there GroupNorm's eps (1e-6) matters
    x = torch.stack([torch.rand(3, 64, 64) * 2 - 1, 0.3 + 1e-3 * torch.randn(3, 64, 64)])
    z = torch.stack([torch.randn(4, 16, 16), 0.5 + 1e-3 * torch.randn(4, 16, 16)])
    with torch.no_grad():
        post_ref, img_ref = ref.encode(x).latent_dist, ref.decode(z).sample
        post, img = model.encode(x), model.decode(z)
    assert post.mean.shape == (2, 4, 16, 16) and img.shape == (2, 3, 64, 64)
    assert rel_err(post.mean, post_ref.mean) < 1e-4
    assert rel_err(img, img_ref) < 1e-4
    assert torch.equal(post.mode(), post.mean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_in_place_inference_path_computes_what_autograd_would(tiny, dtype):
    """Without autograd the ResNet blocks run silu and the skip addition in place and the
    bfloat16 GroupNorm writes its output directly: the same numbers as with autograd on."""
    _, _, official_path = tiny
    model = load_official(official_path, dtype=dtype)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        fast = model.encode(x).mean, model.decode(z)
    with torch.enable_grad():
        slow = model.encode(x).mean, model.decode(z)
    assert all(torch.equal(a, b.detach()) for a, b in zip(fast, slow))


def test_config_is_read_from_names_and_shapes(tiny):
    shapes = {k[len(PREFIX):]: v for k, v in read_shapes(tiny[2]).items()}
    assert checkpoint.config_from_shapes("vae", shapes) == vae.VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, z_channels=4)


def test_full_size_module_has_the_official_names_shapes_and_parameter_count():
    official = {k[len(PREFIX):]: tuple(v) for k, v in KEYS["single_file"]["vae"].items()}
    assert len(official) == 248
    assert checkpoint.config_from_shapes("vae", official) == vae.VAEConfig()
    with torch.device("meta"):
        model = vae.AutoencoderKL(vae.VAEConfig())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official
    assert sum(p.numel() for p in model.parameters()) == KEYS["single_file_param_counts"]["vae"]


def test_from_diffusers_maps_the_full_size_diffusers_file_onto_the_official_layout():
    official = {k[len(PREFIX):]: tuple(v) for k, v in KEYS["single_file"]["vae"].items()}
    sd = {k: torch.empty(v, device="meta") for k, v in KEYS["diffusers"][DIFFUSERS_FILE].items()}
    converted = checkpoint.from_diffusers("vae", sd)
    assert {k: tuple(v.shape) for k, v in converted.items()} == official
    model = checkpoint.build("vae", converted)  # the whole loading path, on meta
    assert model.config == vae.VAEConfig()


def test_the_tests_own_official_names_match_the_official_file_at_full_size():
    # guards the independent table that writes the tiny official-layout file above
    config = {k: v for k, v in KEYS["diffusers_configs"]["vae"].items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = DiffusersVAE(**config)
    official = {k[len(PREFIX):]: tuple(v) for k, v in KEYS["single_file"]["vae"].items()}
    assert {k: tuple(v.shape) for k, v in official_state_dict(ref).items()} == official


def test_full_size_mid_attention_is_one_512_wide_head_through_the_shared_helper(monkeypatch):
    seen = []

    def spy(q, k, v, mask=None, is_causal=False):
        seen.append(tuple(q.shape))
        return v

    monkeypatch.setattr(vae, "attention", spy)
    with torch.device("meta"):
        model = vae.AutoencoderKL(vae.VAEConfig())
        model.decode(model.encode(torch.empty(1, 3, 128, 128)).mean)
    # (B, heads, H·W, D): 128 px -> 16x16 latent, one head of 512
    assert seen == [(1, 1, 256, 512), (1, 1, 256, 512)]


def test_downsample_pads_one_row_and_column_at_the_bottom_right_only():
    down = vae.Downsample(1)
    with torch.no_grad():
        down.conv.bias.zero_()
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # the kernel's top-left tap reads padded[2i, 2j]
        x = torch.arange(1.0, 65.0).view(1, 1, 8, 8)
        out = down(x)
        # (0,1,0,1): padded[2i, 2j] = x[2i, 2j]; symmetric padding would read x[2i-1, 2j-1] (and zeros)
        assert torch.equal(out, x[:, :, ::2, ::2])
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap reads padded[2i+2, 2j+2]
        out = down(x)
        expected = F.pad(x[:, :, 2::2, 2::2], (0, 1, 0, 1))  # last row/column fall on the zero padding
        assert torch.equal(out, expected)


def test_the_vae_normalises_with_the_unets_float32_group_norm():
    """One GroupNorm for both networks (tests/test_unet.py checks it), with the VAE's eps 1e-6."""
    from model import unet

    model = vae.AutoencoderKL(vae.VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(type(m) is unet.GroupNorm32 and m.eps == 1e-6 for m in norms)


def test_bfloat16_matches_float32_loosely(tiny):
    _, _, official_path = tiny
    fp32, bf16 = load_official(official_path), load_official(official_path, dtype=torch.bfloat16)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    z = torch.randn(1, 4, 16, 16)
    # bfloat16 keeps 8 bits of mantissa; diffusers' own bfloat16 VAE is 2-3% (max error over
    # max value) off its float32 output on these weights, so 5% is loose but catches real bugs
    with torch.no_grad():
        assert bf16.decode(z).dtype == torch.bfloat16
        assert rel_err(bf16.encode(x).mean, fp32.encode(x).mean) < 5e-2
        assert rel_err(bf16.decode(z), fp32.decode(z)) < 5e-2


def test_float16_weights_are_upcast_to_float32_and_a_float16_vae_is_refused(tiny):
    _, _, official_path = tiny
    model = load_official(official_path, dtype=torch.float16)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = load_official(official_path)  # the same weights, never rounded to float16
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        img = model.decode(z.half())  # float16 latents from a float16 UNet are accepted
        assert img.dtype == torch.float32
        assert rel_err(img, reference.decode(z)) < 1e-2
        with pytest.raises(UserError, match="float16"):
            model.half().decode(z)


@pytest.mark.parametrize(
    "names, looks_like",
    [
        (["input_blocks.0.0.weight", "time_embed.0.weight"], "no tensor encoder.conv_in.weight"),
        (["text_model.embeddings.token_embedding.weight"], "no tensor encoder.conv_in.weight"),
        (["encoder.down_blocks.0.resnets.0.conv1.weight", "quant_conv.weight"], "convert the diffusers layout"),
        ([PREFIX + "encoder.conv_in.weight", PREFIX + "quant_conv.weight"], "strip the single file's prefix"),
        (["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "decoder.conv_in.weight",
          "decoder.conv_out.weight"], "no tensor quant_conv.weight"),  # SD3/FLUX's 16-channel VAE has none
    ],
)
def test_a_non_vae_state_dict_fails_with_one_sentence_saying_what_it_looks_like(names, looks_like):
    with pytest.raises(CheckpointError) as e:
        checkpoint.build("vae", {n: torch.empty(1, 1, 1, 1) for n in names})
    message = str(e.value)
    assert looks_like in message
    assert "\n" not in message and ". " not in message


@pytest.mark.parametrize("backend", ["auto", "flash", "math"])
def test_mid_attention_runs_on_each_cpu_backend_at_head_widths_fused_kernels_take(backend):
    # Narrow VAEs (fine-tunes, these tests) have heads a fused kernel accepts; the CPU flash
    # kernel refuses a head dimension that is not packed, so the block must hand it packed ones.
    from model import attention

    block = vae.AttnBlock(64, 32)
    x = torch.randn(2, 64, 8, 8)
    attention.set_backend("reference")
    try:
        expected = block(x)
        attention.set_backend(backend)
        assert torch.allclose(block(x), expected, atol=1e-5)
    finally:
        attention.set_backend("auto")
