"""model/unet.py against diffusers' UNet2DConditionModel and the official SDXL layout.

The tiny reference model has SDXL's topology (three levels, no attention at the first, 64-wide
heads, linear projections, text-time added conditioning) at 32/64/128 channels. Its official-
layout file is written with diffusers' own single-file converter run backwards, so our
`from_diffusers` table is checked against an independent implementation, not against itself.
"""

import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file

from model import unet as U
from model import checkpoint
from model.checkpoint import CheckpointError, read_shapes, stream_tensors

KEYS = json.load(open(os.path.join(os.path.dirname(__file__), "data", "sdxl_keys.json")))
PREFIX = "model.diffusion_model."
OFFICIAL = {k[len(PREFIX):]: tuple(v) for k, v in KEYS["single_file"]["unet"].items()}
DIFFUSERS = {k: tuple(v) for k, v in KEYS["diffusers"]["unet/diffusion_pytorch_model.safetensors"].items()}

POOLED, CONTEXT = 32, 32
# SDXL's conditioner embeds each of the 6 size/crop numbers to 256, whatever the model size.
ADM = POOLED + 6 * 256
TINY_DIFFUSERS = dict(
    sample_size=16,
    block_out_channels=(32, 64, 128),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    # diffusers' SDXL config stores the head *count* here: 64/1 and 128/2 give 64-wide heads
    attention_head_dim=(1, 1, 2),
    cross_attention_dim=CONTEXT,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=ADM,
    flip_sin_to_cos=True,
    freq_shift=0,
)
# The same model as our config reads it (the mid block gets the last level's depth, as in diffusers).
TINY = U.UNetConfig(
    model_channels=32,
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 1, 2),
    transformer_depth_middle=2,
    context_dim=CONTEXT,
    adm_in_channels=ADM,
)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def inputs(B=2, size=16):
    g = torch.Generator().manual_seed(1)
    return dict(
        x_t=torch.randn(B, 4, size, size, generator=g),
        t=torch.tensor([999, 3][:B]),
        context=torch.randn(B, 77, CONTEXT, generator=g),
        pooled=torch.randn(B, POOLED, generator=g),
        time_ids=torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 1344, 32, 16, 1024, 1024]][:B]),
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny diffusers UNet saved in both layouts: (model, diffusers file, official file)."""
    torch.manual_seed(0)
    ref = UNet2DConditionModel(**TINY_DIFFUSERS).eval()
    with torch.no_grad():
        # Norm weights/biases start at 1/0 and would hide a swapped pair: randomise every 1-D tensor.
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") and "norm" in name else 0.0))
    folder = tmp_path_factory.mktemp("unet")
    ref.save_pretrained(folder, safe_serialization=True)
    diffusers_file = str(folder / "diffusion_pytorch_model.safetensors")

    # Official names of the tiny model; diffusers' converter (official -> diffusers) tells which
    # diffusers tensor each one is. Passing names as values makes it return the name table itself.
    with torch.device("meta"):
        names = list(U.UNet(TINY).state_dict())
    converted = convert_ldm_unet_checkpoint({PREFIX + n: PREFIX + n for n in names}, ref.config)
    to_official = {d: o[len(PREFIX):] for d, o in converted.items()}
    sd = ref.state_dict()
    assert sorted(to_official) == sorted(sd), "official names and diffusers names must pair up one to one"
    official_file = str(folder / "official.safetensors")
    save_file({PREFIX + o: sd[d].contiguous() for d, o in to_official.items()}, official_file)
    return ref, diffusers_file, official_file, to_official


def load(path, layout):
    names = list(read_shapes(path))
    if layout == "official":
        return checkpoint.build("unet", dict(stream_tensors(path, names, strip_prefix=PREFIX)))
    return checkpoint.build("unet", checkpoint.from_diffusers("unet", dict(stream_tensors(path, names))))


# --- the pieces -------------------------------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin_like_diffusers_flip_sin_to_cos():
    t = torch.tensor([0.0, 1.0, 500.5, 999.0])
    ours = U.timestep_embedding(t, 320)
    assert torch.equal(ours[0], torch.cat([torch.ones(160), torch.zeros(160)]))
    theirs = get_timestep_embedding(t, 320, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.allclose(ours, theirs, atol=1e-6)


# --- the whole UNet against diffusers ---------------------------------------------------------


def test_config_is_read_from_the_tiny_checkpoint(reference):
    _, _, official_file, _ = reference
    shapes = {k[len(PREFIX):]: v for k, v in read_shapes(official_file).items()}
    assert checkpoint.config_from_shapes("unet", shapes) == TINY


def test_from_diffusers_matches_diffusers_own_converter(reference):
    ref, _, _, to_official = reference
    sd = ref.state_dict()
    ours = checkpoint.from_diffusers("unet", sd)
    assert ours.keys() == set(to_official.values())
    for d, o in to_official.items():
        assert ours[o] is sd[d], f"{d} should become {o}"


def test_every_norm_has_the_epsilon_of_its_diffusers_counterpart(reference):
    # The transformers' GroupNorm uses 1e-6, the ResBlocks' 1e-5: too small a difference for the
    # parity test to see at random weights, large enough to matter on real activations.
    ref, _, official_file, to_official = reference
    ours = dict(load(official_file, "official").named_modules())
    norms = [(n, m) for n, m in ref.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert len(norms) > 20
    for name, m in norms:
        assert ours[to_official[name + ".weight"].removesuffix(".weight")].eps == m.eps, name


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_eps_matches_diffusers_in_float32(reference, layout):
    ref, diffusers_file, official_file, _ = reference
    unet = load(official_file if layout == "official" else diffusers_file, layout)
    x = inputs()
    with torch.no_grad():
        expected = ref(
            x["x_t"], x["t"], encoder_hidden_states=x["context"],
            added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]},
        ).sample
        eps = unet(**x)
    assert eps.shape == x["x_t"].shape
    assert rel_err(eps, expected) < 1e-4


def test_one_timestep_number_is_used_for_the_whole_batch(reference):
    _, _, official_file, _ = reference
    unet = load(official_file, "official")
    x = inputs()
    with torch.no_grad():
        per_sample = unet(**{**x, "t": torch.tensor([500, 500])})
        shared = unet(**{**x, "t": 500})
    assert torch.equal(per_sample, shared)


def test_bfloat16_unet_stays_close_to_float32(reference):
    _, _, official_file, _ = reference
    unet = load(official_file, "official")
    x = inputs()
    with torch.no_grad():
        eps32 = unet(**x)
        eps16 = unet.bfloat16()(**x)
    assert eps16.dtype == torch.bfloat16
    assert rel_err(eps16.float(), eps32) < 5e-2


def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes_blocks():
    torch.manual_seed(0)
    unet = U.UNet(TINY)
    x = inputs()
    calls = []
    unet.middle_block[0].register_forward_hook(lambda *_: calls.append(1))

    def grads(checkpointing):
        unet.gradient_checkpointing = checkpointing
        unet.zero_grad()
        context = x["context"].clone().requires_grad_()
        calls.clear()
        eps = unet(**{**x, "context": context})
        (eps * torch.linspace(-1, 1, eps.numel()).reshape(eps.shape)).sum().backward()
        return context.grad, unet.middle_block[1].proj_in.weight.grad.clone(), len(calls)

    ctx_plain, w_plain, calls_plain = grads(False)
    ctx_ckpt, w_ckpt, calls_ckpt = grads(True)
    assert (calls_plain, calls_ckpt) == (1, 2), "checkpointing should rerun each block's forward in backward"
    assert torch.allclose(ctx_ckpt, ctx_plain, rtol=1e-5, atol=1e-7)
    assert torch.allclose(w_ckpt, w_plain, rtol=1e-5, atol=1e-7)


# --- full size on the meta device ---------------------------------------------------------------


def test_full_size_module_has_the_official_names_shapes_and_parameter_count():
    with torch.device("meta"):
        unet = U.UNet(U.UNetConfig())
    sd = unet.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == OFFICIAL
    assert len(sd) == 1680
    assert sum(v.numel() for v in sd.values()) == KEYS["single_file_param_counts"]["unet"] == 2_567_463_684
    assert checkpoint.config_from_shapes("unet", OFFICIAL) == U.UNetConfig()


def test_from_diffusers_renames_the_full_size_diffusers_unet_to_the_official_layout():
    sd = {k: torch.empty(shape, device="meta") for k, shape in DIFFUSERS.items()}
    assert len(sd) == 1680
    assert {k: tuple(v.shape) for k, v in checkpoint.from_diffusers("unet", sd).items()} == OFFICIAL


def test_build_takes_the_full_size_official_tensors_strictly_and_frozen():
    # meta tensors: the 2.6 B parameters are assigned, never allocated
    unet = checkpoint.build("unet", {k: torch.empty(shape, device="meta") for k, shape in OFFICIAL.items()})
    assert unet.config == U.UNetConfig()
    assert all(p.is_meta and not p.requires_grad for p in unet.parameters())


# --- checkpoints that are not an SDXL UNet --------------------------------------------------------


def one_sentence(message):
    return "\n" not in message and message.count(". ") == 0 and len(message) < 250


@pytest.mark.parametrize(
    "case, expected",
    [
        ("vae", "no tensor input_blocks.0.0.weight"),
        ("diffusers", "no tensor input_blocks.0.0.weight"),
        ("prefixed", "strip the single file's prefix"),
        ("sd1", "no tensor label_emb.0.0.weight"),  # SD 1.x/2.x UNets have no added conditioning
        ("conv_proj", "proj_in.weight is"),  # SD 1.x projects with 1×1 convolutions, SDXL with Linear
        ("truncated", "no tensor out.2.weight"),
        ("extra", "1 unexpected (input_blocks.1.0.extra.weight)"),
    ],
)
def test_a_checkpoint_that_is_not_an_sdxl_unet_fails_with_one_sentence(case, expected):
    vae = {k[len("first_stage_model."):]: tuple(v) for k, v in KEYS["single_file"]["vae"].items()}
    shapes = {
        "vae": vae,
        "diffusers": DIFFUSERS,
        "prefixed": {PREFIX + k: v for k, v in OFFICIAL.items()},
        "sd1": {k: v for k, v in OFFICIAL.items() if not k.startswith("label_emb.")},
        "conv_proj": {k: (v + (1, 1) if k.endswith("proj_in.weight") else v) for k, v in OFFICIAL.items()},
        "truncated": {k: v for k, v in OFFICIAL.items() if not k.startswith("out.")},
        "extra": {**OFFICIAL, "input_blocks.1.0.extra.weight": (1,)},
    }[case]
    with pytest.raises(CheckpointError) as e:
        checkpoint.build("unet", {k: torch.empty(v, device="meta") for k, v in shapes.items()})
    assert expected in str(e.value) and one_sentence(str(e.value))


def test_latents_of_any_multiple_of_8_px_match_diffusers(reference):
    """A 1000 px image has 125 x 125 latents: 125 -> 63 -> 32 down, and each Upsample must meet
    its skip connection's size (as diffusers' upsample_size does), not double."""
    ref, _, official_file, _ = reference
    unet = load(official_file, "official")
    x = inputs(size=13)  # 104 px: 13 -> 7 -> 4
    with torch.no_grad():
        expected = ref(x["x_t"], x["t"], encoder_hidden_states=x["context"],
                       added_cond_kwargs={"text_embeds": x["pooled"], "time_ids": x["time_ids"]}).sample
        eps = unet(**x)
    assert eps.shape == x["x_t"].shape
    assert rel_err(eps, expected) < 1e-4
