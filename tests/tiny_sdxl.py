"""A scaled-down SDXL with the real topology, built with diffusers + transformers (random weights).

Shared by the whole-pipeline tests (sample.py against diffusers' StableDiffusionXLPipeline) and
the training tests. The model keeps everything SDXL's loader reads from a checkpoint: three UNet
levels with no attention at the first, 64-wide heads, text-time added conditioning with 256-wide
time-id sinusoids, a 4-level VAE (8x downsampling), CLIP-L with quick_gelu and bigG with gelu and
a projection, the real 49,408-token CLIP vocabulary and both padding conventions.

`save_tiny_sdxl(root)` writes it twice:
  * `root/diffusers/`  — diffusers' own `save_pretrained` (the diffusers folder layout);
  * `root/tiny_sdxl.safetensors` — the official single-file layout: our modules mirror the
    official names (each component's tests check those names independently against the
    official key list and against diffusers' own converters), so the four state dicts loaded
    from the diffusers folder are written back under the four official prefixes.
`save_tiny_mapper(root, weights)` writes a random mapper for its text encoders.
"""

import gzip
import json
import os

import torch
from safetensors.torch import save_file

CLIP_L_WIDTH, BIGG_WIDTH, POOLED = 64, 128, 32  # one and two 64-wide heads; small projection
CONTEXT = CLIP_L_WIDTH + BIGG_WIDTH


def _randomize(module, generator):
    """Random weights everywhere, biases and norm scales included, so no mis-mapped tensor hides."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=generator))
            elif p.ndim == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(torch.randn(p.shape, generator=generator) / max(1, p[0].numel()) ** 0.5)


def _write_tokenizer_files(folder, pad_token):
    """vocab.json + merges.txt from the bundled CLIP vocabulary (what SDXL's hub folders hold)."""
    from model.clip import BUNDLED_VOCAB, NUM_MERGES, bytes_to_unicode

    with gzip.open(BUNDLED_VOCAB, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : NUM_MERGES + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    from transformers import CLIPTokenizer

    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         pad_token=pad_token, model_max_length=77)


def build_tiny_pipeline(tmp, seed=0):
    """diffusers' StableDiffusionXLPipeline at tiny SDXL topology with a DDIM scheduler."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    g = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), attention_head_dim=(1, 1, 2),  # heads of 64
        cross_attention_dim=CONTEXT, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=POOLED + 6 * 256, norm_num_groups=32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        scaling_factor=0.13025, force_upcast=False,
    )
    common = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=2,
                  pad_token_id=1, layer_norm_eps=1e-5, attn_implementation="eager")
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=CLIP_L_WIDTH, intermediate_size=4 * CLIP_L_WIDTH,
                                                num_hidden_layers=2, num_attention_heads=1,
                                                hidden_act="quick_gelu", **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=BIGG_WIDTH, intermediate_size=4 * BIGG_WIDTH,
                                                                num_hidden_layers=2, num_attention_heads=2,
                                                                hidden_act="gelu", projection_dim=POOLED, **common))
    for m in (unet, vae, text_encoder, text_encoder_2):
        _randomize(m, g)
        m.eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    tok = _write_tokenizer_files(os.path.join(tmp, "_tok_l"), "<|endoftext|>")
    tok_2 = _write_tokenizer_files(os.path.join(tmp, "_tok_g"), "!")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tok, tokenizer_2=tok_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def save_tiny_sdxl(root, seed=0):
    """Write the tiny SDXL in both layouts; returns (pipeline, diffusers folder, single file)."""
    from model.checkpoint import PREFIX
    from model.sdxl import SDXL

    pipe = build_tiny_pipeline(root, seed)
    folder = os.path.join(root, "diffusers")
    pipe.save_pretrained(folder, safe_serialization=True)
    ours = SDXL.load(folder)
    single = {}
    for name, module in (("unet", ours.unet), ("vae", ours.vae), ("clip_l", ours.clip_l), ("clip_g", ours.clip_g)):
        for k, v in module.state_dict().items():
            single[PREFIX[name] + k] = v.contiguous()
    path = os.path.join(root, "tiny_sdxl.safetensors")
    save_file(single, path)
    return pipe, folder, path


def save_tiny_mapper(root, weights):
    """A random, untrained CoCoIns mapper for the tiny SDXL at `weights`; returns its file. Untrained,
    it still maps each code to its own pseudo-word: same code, same image; other code, other image."""
    from model.checkpoint import save_mapper
    from model.mapper import Mapper, MapperConfig, embedding_stats
    from model.sdxl import SDXL

    model = SDXL.load(weights)
    stats = [embedding_stats(model.clip_l.text_model.embeddings.token_embedding.weight),
             embedding_stats(model.clip_g.token_embedding.weight)]
    config = MapperConfig(z_dim=16, depth=2, hidden=32, token_widths=tuple(m.numel() for m, _ in stats))
    path = os.path.join(root, "mapper.safetensors")
    save_mapper(path, Mapper(config, stats))
    return path
