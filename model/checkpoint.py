"""Loading: from a path on disk to the four SDXL models, built on the meta device and assigned.

The chapters (`unet.py`, `vae.py`, `clip.py`) define modules whose attribute names equal the
official single file's, so loading that file is a prefix split. Everything else a loader must
know lives here, in this order:

1. finding the weights: `weights/`, the Hugging Face cache, a single file or a diffusers folder
   (shards, `.fp16` variants), refusing pickles, and naming a foreign model in one sentence;
2. reading safetensors: header shapes first, then tensors streamed one at a time to the target
   device and dtype, so host memory stays near one tensor;
3. the architecture read from the checkpoint's names and shapes (`config_from_shapes`);
4. one renaming mechanism for the diffusers layout: ordered regex rules per model, plus the two
   tensor changes the layouts really differ by (`from_diffusers`);
5. `build`: the module on the meta device, `load_state_dict(strict=True, assign=True)`, so no
   parameter is ever initialised or held twice, and a file that does not fit fails with one
   sentence naming its missing, unexpected or misshapen tensors;
6. trained CoCoIns mappers, saved atomically and loaded the same strict way.

Read next: model/sdxl.py (which calls `load_sdxl`), or model/clip.py for the models themselves.
"""

import glob
import json
import os
import re
import struct
import tempfile
from dataclasses import asdict, dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.clip import CLIPTextConfig, CLIPTextModel, OpenCLIPTextConfig, OpenCLIPTextModel, Tokenizer
from model.clip_vision import CLIPModel, CLIPVisionConfig
from model.errors import UserError
from model.mapper import Mapper, MapperConfig
from model.unet import UNet, UNetConfig
from model.vae import AutoencoderKL, VAEConfig


class CheckpointError(UserError):
    """A checkpoint file that is missing, unreadable or not what it should be."""


# Key prefixes of the four models inside the official single file (sgm's DiffusionEngine).
PREFIX = {
    "unet": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "conditioner.embedders.0.transformer.",
    "clip_g": "conditioner.embedders.1.model.",
}
# Tensors an SDXL single file may carry besides the four models, ignored on purpose (anything
# else outside the four prefixes is an error, so no tensor is silently dropped):
# - `denoiser.sigmas`: the 1000 noise levels σ_t that sgm's DiscreteDenoiser derives from the
#   schedule; model/ddim.py computes the schedule itself (the reference README: ignore it);
# - `model_ema.*`: sgm's moving-average copy of the UNet in training checkpoints; sgm's SDXL
#   inference configs do not read it either.
IGNORED_KEYS = ("denoiser.sigmas",)
IGNORED_PREFIXES = ("model_ema.",)
# Keys inside a model that its module deliberately does not have:
# - `position_ids`: transformers' buffer of the constants 0..76 (in CLIP-L's official part, and
#   in both diffusers text encoders); the modules index the positional embedding directly;
# - `logit_scale`: CLIP's contrastive temperature, used only when CLIP itself trains.
IGNORED = {"clip_l": ("text_model.embeddings.position_ids",), "clip_g": ("logit_scale", "position_ids")}
# Each model's subfolder and file stem in the diffusers folder layout.
DIFFUSERS_FILES = {
    "unet": ("unet", "diffusion_pytorch_model"),
    "vae": ("vae", "diffusion_pytorch_model"),
    "clip_l": ("text_encoder", "model"),
    "clip_g": ("text_encoder_2", "model"),
}
OFFICIAL_FILENAME = "sd_xl_base_1.0.safetensors"
HUB_REPO_FOLDER = "models--stabilityai--stable-diffusion-xl-base-1.0"
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights")
MISSING_WEIGHTS = (
    "no SDXL weights found (looked for weights/{name} and an SDXL base snapshot in the Hugging Face "
    "cache); run `python weights/download.py` to fetch the official file (6.9 GB) into weights/, "
    "or pass --weights PATH to a single file or a diffusers folder"
).format(name=OFFICIAL_FILENAME)


# ----------------------------------------------------------------------------------------------
# 1. Finding the weights
# ----------------------------------------------------------------------------------------------

def hub_cache_dir() -> str:
    """The folder huggingface_hub downloads into, resolved as huggingface_hub resolves it:
    HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    env = os.environ.get
    home = env("HF_HOME") or os.path.join(env("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env("HF_HUB_CACHE") or env("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def hub_snapshots(repo_folder: str = HUB_REPO_FOLDER) -> list[str]:
    """A model's snapshots in the Hugging Face cache (SDXL base's unless told), the one `refs/main`
    names (the latest download) first."""
    repo = os.path.join(hub_cache_dir(), repo_folder)
    snapshots = sorted(glob.glob(os.path.join(repo, "snapshots", "*")))
    try:
        with open(os.path.join(repo, "refs", "main")) as f:
            main = os.path.join(repo, "snapshots", f.read().strip())
    except OSError:
        return snapshots
    return sorted(snapshots, key=lambda s: s != main)


def find_default_weights() -> str | None:
    """The official file in weights/, else an SDXL base snapshot already in the Hugging Face cache.

    People who used diffusers already have the weights on disk: never make them download twice.
    A cached snapshot counts only when it is complete (the single file, or all four diffusers
    components), so a partial download is never picked."""
    local = os.path.join(WEIGHTS_DIR, OFFICIAL_FILENAME)
    if os.path.isfile(local):
        return local
    for snapshot in hub_snapshots():
        single = os.path.join(snapshot, OFFICIAL_FILENAME)
        if os.path.isfile(single):  # isfile follows the cache's symlinks into blobs/
            return single
        if all(_diffusers_file(os.path.join(snapshot, sub), stem) for sub, stem in DIFFUSERS_FILES.values()):
            return snapshot
    return None


def describe_foreign(shapes: dict) -> str | None:
    """If a single file is not SDXL base, say what it looks like (None when it is SDXL base)."""
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if any("lora" in k.lower() for k in keys):
        return "a LoRA (low-rank adapter), not a full model; load it with a tool that applies LoRAs to SDXL"
    if has("model.diffusion_model.joint_blocks") or has("joint_blocks."):
        return "a Stable Diffusion 3 checkpoint, a different architecture"
    if has("model.diffusion_model.double_blocks") or has("double_blocks."):
        return "a FLUX checkpoint, a different architecture"
    if has("cond_stage_model.transformer."):
        return "a Stable Diffusion 1.x checkpoint (one CLIP-L text encoder), not SDXL"
    if has("cond_stage_model.model."):
        return "a Stable Diffusion 2.x checkpoint (one OpenCLIP-H text encoder), not SDXL"
    if has("conditioner.embedders.0.model.") and not has(PREFIX["clip_l"]):
        return "the SDXL refiner (one bigG text encoder), not SDXL base"
    if has("conv_in.weight") and has("time_embedding."):
        return "a diffusers UNet file on its own; pass the diffusers folder that contains unet/, vae/ and the text encoders"
    if has("encoder.down_blocks.") or has("encoder.down."):
        return "a VAE on its own; pass it with --vae and the full model with --weights"
    missing = [name for name, prefix in PREFIX.items() if not has(prefix)]
    if missing:
        return f"not an SDXL base single file: it has no {', '.join(missing)} weights (expected key prefixes {', '.join(PREFIX[m] for m in missing)})"
    conv_in = shapes.get(PREFIX["unet"] + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in[1] != 4:
        return (f"an SDXL whose UNet takes {conv_in[1]} input channels, not 4 (an inpainting or other "
                f"special-purpose model); use SDXL base or a fine-tune of it")
    return None


def _diffusers_file(folder: str, stem: str) -> list[str] | None:
    """The safetensors file(s) of one diffusers component, preferring full precision over `.fp16`.

    Large components may be sharded (`stem-00001-of-00002.safetensors`); all shards are returned,
    and a missing shard is an error here rather than a list of missing tensors later."""
    for variant in ("", ".fp16"):
        single = os.path.join(folder, f"{stem}{variant}.safetensors")
        if os.path.isfile(single):
            return [single]
        shards = sorted(glob.glob(os.path.join(folder, f"{stem}{variant}-*-of-*.safetensors")))
        if shards:
            count = shards[0].rsplit("-of-", 1)[1].split(".")[0]  # "00002" from ...-00001-of-00002.safetensors
            expected = [os.path.join(folder, f"{stem}{variant}-{k:0{len(count)}d}-of-{count}.safetensors")
                        for k in range(1, int(count) + 1)]
            if shards != expected:
                absent = sorted(set(expected) - set(shards)) or shards
                raise CheckpointError(f"{folder} holds an incomplete set of {count} shards ({os.path.basename(absent[0])} is missing or misnamed); download the missing files")
            return shards
    return None


@dataclass
class Part:
    """Where one model's tensors are: files, the key prefix to strip, and the layout of the names."""
    files: list[str]
    prefix: str = ""
    diffusers: bool = False


def locate(path: str) -> dict[str, Part]:
    """Map a user's --weights path to the files holding each of the four models."""
    if os.path.isdir(path):
        parts = {}
        for name, (sub, stem) in DIFFUSERS_FILES.items():
            files = _diffusers_file(os.path.join(path, sub), stem)
            if files is None:
                if os.path.isfile(os.path.join(path, OFFICIAL_FILENAME)):
                    return locate(os.path.join(path, OFFICIAL_FILENAME))
                raise CheckpointError(
                    f"{path} is not an SDXL diffusers folder: {sub}/{stem}.safetensors is missing "
                    "(pass the folder holding unet/, vae/, text_encoder/ and text_encoder_2/, or the single .safetensors file)"
                )
            parts[name] = Part(files, diffusers=True)
        return parts
    if not os.path.exists(path):
        raise CheckpointError(f"--weights {path} does not exist; {MISSING_WEIGHTS.split('; ', 1)[1]}")
    shapes = read_shapes(path)
    foreign = describe_foreign(shapes)
    if foreign:
        raise CheckpointError(f"{path} is {foreign}")
    # Strict accounting: every tensor belongs to one of the four models or is a known extra.
    unknown = sorted(k for k in shapes if not k.startswith((*PREFIX.values(), *IGNORED_PREFIXES)) and k not in IGNORED_KEYS)
    if unknown:
        raise CheckpointError(
            f"{path} holds {len(unknown)} tensors outside SDXL's four models ({', '.join(unknown[:3])}"
            f"{' and more' if len(unknown) > 3 else ''}); it is not an SDXL base single file"
        )
    return {name: Part([path], prefix) for name, prefix in PREFIX.items()}


def locate_vae(path: str) -> Part:
    """--vae: a VAE alone, in either layout (file or diffusers folder), or a whole SDXL checkpoint."""
    if os.path.isdir(path):
        files = _diffusers_file(path, "diffusion_pytorch_model") or _diffusers_file(
            os.path.join(path, "vae"), "diffusion_pytorch_model")
        if files is None:
            raise CheckpointError(f"--vae {path} holds no diffusion_pytorch_model.safetensors; pass the VAE folder or its .safetensors file")
        return Part(files, diffusers=True)
    keys = read_shapes(path).keys()
    if any(k.startswith(PREFIX["vae"]) for k in keys):
        return Part([path], PREFIX["vae"])
    if any(k.startswith("encoder.down_blocks.") for k in keys):
        return Part([path], diffusers=True)
    if any(k.startswith("encoder.down.") for k in keys):
        return Part([path])
    raise CheckpointError(f"--vae {path} is not an autoencoder checkpoint (no encoder/decoder weights in either layout)")


# ----------------------------------------------------------------------------------------------
# 2. Reading safetensors
# ----------------------------------------------------------------------------------------------

def _open(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        with open(path, "rb") as f:
            magic = f.read(2)
        # torch.save writes a zip archive ("PK") since PyTorch 1.6, a bare pickle before
        # (0x80 then the protocol number, 2 to 5). Pickles can run code when loaded: never read.
        if magic == b"PK" or (len(magic) == 2 and magic[0] == 0x80 and 2 <= magic[1] <= 5):
            raise CheckpointError(
                f"{path} is a PyTorch pickle checkpoint (torch.save, as in .ckpt/.pt files), not safetensors; "
                "get the .safetensors release of the model (pickles can run code when loaded, so they are not read here)"
            ) from None
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt, download it again"
        ) from None


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors header only."""
    with _open(path) as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def read_metadata(path: str) -> dict[str, str]:
    with _open(path) as f:
        return f.metadata() or {}


def stream_tensors(path, names, device="cpu", dtype=None, strip_prefix=""):
    """Yield (name without `strip_prefix`, tensor) for each name, one tensor in memory at a time.

    Floating tensors are cast to `dtype` (when given); integer tensors keep theirs."""
    with _open(path) as f:
        for name in names:
            try:
                t = f.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"tensor {name} in {path} cannot be read ({e}); the file may be corrupt") from None
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield name[len(strip_prefix):], t.to(device)


def read_part(part: Part, device, dtype) -> dict[str, torch.Tensor]:
    """Stream one model's tensors (names relative to its prefix) to `device` in `dtype`."""
    sd = {}
    for file in part.files:
        names = [k for k in read_shapes(file) if k.startswith(part.prefix)]
        sd.update(stream_tensors(file, names, device=device, dtype=dtype, strip_prefix=part.prefix))
    return sd


# ----------------------------------------------------------------------------------------------
# 3. The architecture, read from official names and shapes
# ----------------------------------------------------------------------------------------------

WHAT = {"unet": "UNet", "vae": "VAE", "clip_l": "CLIP-L text encoder", "clip_g": "OpenCLIP bigG text encoder"}


def _count(shapes, prefix: str) -> int:
    """1 + the highest N among names `prefix` + `N.…`: a missing middle block shows as missing keys."""
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)), default=-1)


def _unet_config(shapes) -> UNetConfig:
    C = shapes["input_blocks.0.0.weight"][0]
    # Walk the input blocks: a Downsample (".0.op") closes a level; every other block starts with a ResBlock.
    levels = [[]]
    for i in range(1, _count(shapes, "input_blocks.")):
        if f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
        else:
            levels[-1].append(i)
    return UNetConfig(
        in_channels=shapes["input_blocks.0.0.weight"][1],
        out_channels=shapes["out.2.weight"][0],
        model_channels=C,
        channel_mult=tuple(shapes[f"input_blocks.{blocks[0]}.0.in_layers.2.weight"][0] // C for blocks in levels),
        num_res_blocks=len(levels[0]),
        transformer_depth=tuple(_count(shapes, f"input_blocks.{blocks[0]}.1.transformer_blocks.") for blocks in levels),
        transformer_depth_middle=_count(shapes, "middle_block.1.transformer_blocks."),
        context_dim=shapes["middle_block.1.transformer_blocks.0.attn2.to_k.weight"][1],
        adm_in_channels=shapes["label_emb.0.0.weight"][1],
    )


def _vae_config(shapes) -> VAEConfig:
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    # each level's width is the output width of its first ResNet's first conv
    widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in range(_count(shapes, "encoder.down."))]
    shapes["quant_conv.weight"]  # (SD3/FLUX autoencoders have none: not SDXL's)
    return VAEConfig(
        in_channels=in_channels,
        out_channels=shapes["decoder.conv_out.weight"][0],
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=_count(shapes, "encoder.down.0.block."),
        z_channels=shapes["decoder.conv_in.weight"][1],
    )


def _text_config(shapes, cls, names: dict):
    vocab_size, width = shapes[names["token"]]
    extra = {"projection_dim": shapes["text_projection"][1]} if cls is OpenCLIPTextConfig else {}
    return cls(vocab_size=vocab_size, context_length=shapes[names["position"]][0], width=width,
               layers=_count(shapes, names["layers"]), heads=width // 64,  # SDXL's heads are 64 wide
               mlp_width=shapes[names["mlp"]][0], **extra)


CONFIG_READERS = {
    "unet": _unet_config,
    "vae": _vae_config,
    "clip_l": lambda s: _text_config(s, CLIPTextConfig, dict(
        token="text_model.embeddings.token_embedding.weight", position="text_model.embeddings.position_embedding.weight",
        layers="text_model.encoder.layers.", mlp="text_model.encoder.layers.0.mlp.fc1.weight")),
    "clip_g": lambda s: _text_config(s, OpenCLIPTextConfig, dict(
        token="token_embedding.weight", position="positional_embedding",
        layers="transformer.resblocks.", mlp="transformer.resblocks.0.mlp.c_fc.weight")),
}


def config_from_shapes(name: str, shapes: dict[str, tuple]):
    """The config of model `name` (unet, vae, clip_l, clip_g) from its official, unprefixed names and shapes."""
    try:
        return CONFIG_READERS[name](shapes)
    except KeyError as e:
        raise CheckpointError(
            f"the {WHAT[name]} weights have no tensor {e.args[0]}, so they are not an SDXL {WHAT[name]} in the "
            f"official layout (strip the single file's prefix, or convert the diffusers layout, first)"
        ) from None


# ----------------------------------------------------------------------------------------------
# 4. The diffusers layout -> official names: ordered regex rules, one list per model
# ----------------------------------------------------------------------------------------------

def _unet_rules(names) -> list:
    n = _count(names, "down_blocks.0.resnets.")  # ResBlocks per level going down (one more going up)
    up_attention = [any(k.startswith(f"up_blocks.{i}.attentions.") for k in names)
                    for i in range(_count(names, "up_blocks."))]
    # input block of down_blocks.L's J-th layer: conv_in is 0, then n ResBlocks + a Downsample per level
    down = lambda m, j: 1 + int(m[1]) * (n + 1) + j  # noqa: E731
    up = lambda m, j: int(m[1]) * (n + 1) + j  # noqa: E731
    return [
        # Inside a ResBlock diffusers renames the layers; inside a transformer every name is the same.
        (r"(resnets\.\d+\.)norm1\.", r"\1in_layers.0."),
        (r"(resnets\.\d+\.)conv1\.", r"\1in_layers.2."),
        (r"(resnets\.\d+\.)time_emb_proj\.", r"\1emb_layers.1."),
        (r"(resnets\.\d+\.)norm2\.", r"\1out_layers.0."),
        (r"(resnets\.\d+\.)conv2\.", r"\1out_layers.3."),
        (r"(resnets\.\d+\.)conv_shortcut\.", r"\1skip_connection."),
        (r"^conv_in\.", "input_blocks.0.0."),
        (r"^time_embedding\.linear_(\d)\.", lambda m: f"time_embed.{2 * int(m[1]) - 2}."),
        (r"^add_embedding\.linear_(\d)\.", lambda m: f"label_emb.0.{2 * int(m[1]) - 2}."),
        (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"input_blocks.{down(m, int(m[2]))}.0."),
        (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"input_blocks.{down(m, int(m[2]))}.1."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{down(m, n)}.0.op."),
        (r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
        (r"^mid_block\.attentions\.0\.", "middle_block.1."),
        (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"output_blocks.{up(m, int(m[2]))}.0."),
        (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"output_blocks.{up(m, int(m[2]))}.1."),
        # the Upsample joins its level's last block, after the transformer (.2) where there is one
        (r"^up_blocks\.(\d+)\.upsamplers\.0\.",
         lambda m: f"output_blocks.{up(m, n)}.{2 if up_attention[int(m[1])] else 1}."),
        (r"^conv_norm_out\.", "out.0."),
        (r"^conv_out\.", "out.2."),
    ]


def _vae_rules(names) -> list:
    levels = _count(names, "decoder.up_blocks.")
    return [
        # PITFALL: diffusers numbers decoder levels in execution order (up_blocks.0 = lowest
        # resolution); the official file numbers them by resolution like the encoder.
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}."),
        (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
        (r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", r".mid.attn_1.\1."),
        (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]


# transformers 4.x saved CLIP text models with a `text_model.` prefix (SDXL's hub files have
# it); transformers 5.x saves them without. Both spell the same model.
_TEXT_MODEL_PREFIX = (r"^(?!text_model\.|text_projection|logit_scale)", "text_model.")
# CLIP-L: the official file stores it as a transformers CLIPTextModel, so only that prefix differs.
_CLIP_L_RULES = [_TEXT_MODEL_PREFIX]
# bigG: transformers' CLIPTextModelWithProjection names -> OpenCLIP's.
_CLIP_G_RULES = [
    _TEXT_MODEL_PREFIX,
    (r"^text_model\.embeddings\.token_embedding\.", "token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.embeddings\.position_ids$", "position_ids"),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"^text_model\.encoder\.layers\.(\d+)\.", r"transformer.resblocks.\1."),
    (r"\.layer_norm(\d)\.", r".ln_\1."),
    (r"\.self_attn\.", ".attn."),  # q/k/v_proj are fused below; out_proj keeps its name
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
    (r"^text_projection\.weight$", "text_projection"),
]
RULES = {"unet": _unet_rules, "vae": _vae_rules, "clip_l": lambda names: _CLIP_L_RULES,
         "clip_g": lambda names: _CLIP_G_RULES}


def _vae_tensors(sd):
    # diffusers' mid attention is nn.Linear [C, C]; the official file has 1x1 convs [C, C, 1, 1]
    return {k: t[:, :, None, None] if ".mid.attn_1." in k and t.ndim == 2 else t for k, t in sd.items()}


def _clip_g_tensors(sd):
    # text_projection: a Linear there (y = x·Wᵀ), P = Wᵀ here (y = x·P)
    if "text_projection" in sd:
        sd["text_projection"] = sd["text_projection"].t().contiguous()
    # q, k, v -> in_proj rows [q; k; v], as torch.nn.MultiheadAttention splits them. An
    # incomplete triple keeps its names, and the strict loader names what is missing.
    for key in [k for k in sd if ".attn.q_proj." in k]:
        parts = [key.replace(".q_proj.", f".{p}_proj.") for p in "qkv"]
        if all(p in sd for p in parts):
            block, kind = key.split(".attn.q_proj.")
            sd[f"{block}.attn.in_proj_{kind}"] = torch.cat([sd.pop(p) for p in parts])
    return sd


TENSOR_CHANGES = {"vae": _vae_tensors, "clip_g": _clip_g_tensors}


def from_diffusers(name: str, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Model `name`'s diffusers state dict under the official names (works on meta tensors).

    Names no rule knows pass through unchanged, for the strict loader to report."""
    rules, out = RULES[name](list(sd)), {}
    for key, t in sd.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = t
    return TENSOR_CHANGES.get(name, lambda sd: sd)(out)


# ----------------------------------------------------------------------------------------------
# 5. Build on the meta device, assign strictly
# ----------------------------------------------------------------------------------------------

MODULES = {"unet": UNet, "vae": AutoencoderKL, "clip_l": CLIPTextModel, "clip_g": OpenCLIPTextModel}


def _examples(keys, n=3):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_strict(module: torch.nn.Module, state_dict: dict, what: str, ignore=()) -> torch.nn.Module:
    """Assign `state_dict` to a meta-device `module`, requiring an exact match of names and shapes.

    `ignore` lists keys that checkpoints may legitimately carry and the module does not use."""
    state_dict = {k: v for k, v in state_dict.items() if k not in ignore}
    expected = module.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    if missing or unexpected:
        parts = [f"{len(keys)} {kind} ({_examples(keys)})" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise CheckpointError(f"the {what} weights do not match the {what} architecture: " + "; ".join(parts) + " tensors")
    wrong = [k for k, v in state_dict.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        raise CheckpointError(
            f"the {what} weights have {len(wrong)} tensors of the wrong shape: {k} is "
            f"{tuple(state_dict[k].shape)} but the architecture needs {tuple(expected[k].shape)}"
        )
    module.load_state_dict(state_dict, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def build(name: str, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Model `name` (unet, vae, clip_l, clip_g) for an official-layout state dict, prefix stripped."""
    if name == "vae":
        # PITFALL: the SDXL VAE overflows in float16: float16 weights (the diffusers `.fp16`
        # variant) are upcast to float32 (84 M parameters, 335 MB).
        sd = {k: v.float() if v.dtype == torch.float16 else v for k, v in sd.items()}
    config = config_from_shapes(name, {k: tuple(v.shape) for k, v in sd.items()})
    with torch.device("meta"):
        module = MODULES[name](config)
    return load_strict(module, sd, WHAT[name], IGNORED.get(name, ()))


def tokenizer_from_diffusers(folder: str) -> Tokenizer:
    """The tokenizer of a diffusers `tokenizer/` or `tokenizer_2/` folder (vocab.json,
    merges.txt, and the pad token from special_tokens_map.json or tokenizer_config.json)."""
    paths = {name: os.path.join(folder, name) for name in ("vocab.json", "merges.txt")}
    for path in paths.values():
        if not os.path.isfile(path):
            raise UserError(f"{path} is missing; point to a diffusers tokenizer folder with vocab.json and merges.txt")
    with open(paths["vocab.json"], encoding="utf-8") as f:
        vocab = json.load(f)
    with open(paths["merges.txt"], encoding="utf-8") as f:
        # Line 0 is "#version: 0.2"; every other non-empty line is one merge, in rank order.
        merges = [tuple(line.split()) for line in f.read().split("\n")[1:] if line.strip()]
    pad = "<|endoftext|>"  # transformers' default when a folder names no pad token
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                entry = json.load(f).get("pad_token")
            if entry is not None:
                # Either the token itself or an AddedToken record {"content": ..., ...}.
                pad = entry["content"] if isinstance(entry, dict) else entry
    if pad not in vocab:
        raise UserError(f"the pad token {pad!r} named in {folder} is not in its vocab.json; fix the folder's special_tokens_map.json")
    return Tokenizer(vocab, merges, vocab[pad])


def load_sdxl(path: str, device, dtype, vae_path: str | None = None) -> dict:
    """The four models and two tokenizers of the SDXL at `path` (single file or diffusers folder),
    each model streamed to `device` in `dtype`; `vae_path` replaces the VAE."""
    parts = locate(path)
    if vae_path is not None:
        parts["vae"] = locate_vae(vae_path)
    models = {}
    for name, part in parts.items():
        # PITFALL: the SDXL VAE overflows in float16; it is kept in float32 in that case.
        sd = read_part(part, device, torch.float32 if (name == "vae" and dtype == torch.float16) else dtype)
        models[name] = build(name, from_diffusers(name, sd) if part.diffusers else sd)
        del sd
    models["tok_l"], models["tok_g"] = Tokenizer.bundled(pad="eos"), Tokenizer.bundled(pad="!")
    # A diffusers folder brings its own tokenizer files; use them when present.
    for tok, sub in (("tok_l", "tokenizer"), ("tok_g", "tokenizer_2")):
        if os.path.isfile(os.path.join(path, sub, "vocab.json")):
            models[tok] = tokenizer_from_diffusers(os.path.join(path, sub))
    return models


# ----------------------------------------------------------------------------------------------
# 6. Trained CoCoIns mappers
# ----------------------------------------------------------------------------------------------

# safetensors metadata that marks a file as a mapper and records its architecture.
FORMAT_KEY, FORMAT = "format", "cocoins-mapper"
CONFIG_KEY = "mapper_config"


def save_mapper(path: str, mapper: Mapper, metadata: dict[str, str] | None = None) -> None:
    """Write `mapper` (unwrapped from DDP) to a safetensors file, atomically.

    `metadata` (string values, e.g. the training arguments as JSON) is stored beside the config;
    the keys "format" and "mapper_config" are the mapper's own. The file is written to a temporary
    name in the same folder and renamed over `path`, so a killed process leaves the previous file
    intact and never a partial one (`write_atomically`)."""
    meta = {**(metadata or {}), FORMAT_KEY: FORMAT, CONFIG_KEY: json.dumps(asdict(mapper.config))}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in mapper.state_dict().items()}
    save_safetensors(path, tensors, meta)


def save_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """`save_file`, atomically (`write_atomically`), with the metadata in sorted order.

    safetensors writes its metadata from a Rust HashMap, in an order that changes from process to process,
    so two runs that compute the same file would write different bytes. Sorting the keys in the header
    (same JSON, same length) makes equal content equal bytes, and a SHA-256 a fair name for a file."""
    def write(tmp):
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "r+b") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            if "__metadata__" in header:
                header = {"__metadata__": dict(sorted(header.pop("__metadata__").items())), **header}
                # the JSON safetensors writes (serde_json: compact, UTF-8 as is), padded to its length
                text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
                f.seek(8)
                f.write(text.ljust(n))

    write_atomically(path, write)


def write_atomically(path: str, write) -> None:
    """`write(tmp)` writes the file at a temporary name in `path`'s folder; it is synced to disk, given
    the mode the umask gives new files, and renamed over `path`. A killed process leaves the previous
    file intact, never a partial one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's file is private (0600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def current_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def load_mapper(path: str, device="cpu") -> Mapper:
    """A mapper written by `save_mapper`, in eval mode with gradients off (call
    `.train().requires_grad_(True)` to continue training it)."""
    meta = read_metadata(path)
    if meta.get(FORMAT_KEY) != FORMAT or CONFIG_KEY not in meta:
        raise CheckpointError(f"{path} is not a CoCoIns mapper checkpoint; pass the mapper.safetensors that train.py writes")
    try:
        fields = json.loads(meta[CONFIG_KEY])
        config = MapperConfig(**{**fields, "token_widths": tuple(fields["token_widths"])})
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"the mapper config stored in {path} is unreadable ({err}); the file may be corrupt") from None
    # Placeholder statistics; the file's own are assigned with the weights just below.
    mapper = Mapper(config, [(torch.zeros(D), torch.ones(D)) for D in config.token_widths])
    # f computes in float32 whatever its file stores (a float16 file is half the size).
    state = dict(stream_tensors(path, read_shapes(path), device=device, dtype=torch.float32))
    return load_strict(mapper.to(device), state, "mapper")


# ----------------------------------------------------------------------------------------------
# CLIP ViT-L/14 whole (CLIP-T, eval.py): the Hugging Face openai/clip-vit-large-patch14 layout
# ----------------------------------------------------------------------------------------------


# Tensors a transformers CLIPModel file carries that our CLIPModel deliberately does not have:
# - `logit_scale`: CLIP's training temperature; CLIP-T is the raw cosine, so it is never read;
# - `*.position_ids`: transformers' buffers of the constants 0..76 and 0..256 (older saves only).
CLIP_IGNORED = ("logit_scale", "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# What a file must hold to be CLIP (text and image towers and both projections).
_CLIP_SIGNATURE = ("text_model.embeddings.token_embedding.weight", "vision_model.embeddings.class_embedding",
                   "visual_projection.weight", "text_projection.weight")


def clip_from_transformers(sd: dict[str, torch.Tensor], source: str = "the CLIP weights") -> dict[str, torch.Tensor]:
    """Hugging Face `openai/clip-vit-large-patch14` (transformers CLIPModel) names -> our CLIPModel names.

    The two layouts name every tensor alike, so the map is the identity after dropping the
    documented CLIP_IGNORED keys; it lives here, in one function, so that a layout that ever
    differs has one place to go. Anything that is not a whole CLIP fails in one sentence."""
    missing = [k for k in _CLIP_SIGNATURE if k not in sd]
    if missing:
        raise CheckpointError(
            f"{source} is not a CLIP model in the Hugging Face openai/clip-vit-large-patch14 layout "
            f"(no tensor {missing[0]}); pass --clip the folder or model.safetensors of that model"
        )
    return {k: v for k, v in sd.items() if k not in CLIP_IGNORED}


def clip_config_from_state_dict(shapes: dict[str, tuple]) -> tuple[CLIPTextConfig, CLIPVisionConfig, int]:
    """(text config, vision config, projection width) from our CLIPModel's tensor names and shapes."""
    width = shapes["vision_model.embeddings.class_embedding"][0]
    patch = shapes["vision_model.embeddings.patch_embedding.weight"][-1]
    num_positions = shapes["vision_model.embeddings.position_embedding.weight"][0]
    vision = CLIPVisionConfig(
        # positions = (S / patch)² + 1  =>  S = patch·√(positions − 1)
        image_size=patch * round((num_positions - 1) ** 0.5),
        patch_size=patch,
        width=width,
        layers=_count(shapes, "vision_model.encoder.layers."),
        heads=width // 64,  # heads 64 wide, as in every CLIP here
        mlp_width=shapes["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
    )
    projection_dim = shapes["visual_projection.weight"][0]
    return config_from_shapes("clip_l", shapes), vision, projection_dim


def build_clip_model(sd: dict[str, torch.Tensor]) -> CLIPModel:
    """Our CLIPModel from our names (after `clip_from_transformers`): built on meta, assigned strictly."""
    text, vision, projection_dim = clip_config_from_state_dict({k: tuple(v.shape) for k, v in sd.items()})
    with torch.device("meta"):
        model = CLIPModel(text, vision, projection_dim)
    return load_strict(model, sd, "CLIP ViT-L/14")
