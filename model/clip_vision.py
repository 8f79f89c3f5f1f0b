"""CLIP ViT-L/14 whole: the image tower and both projections, for the CLIP-T score of eval.py.

Not a chapter of SDXL (SDXL reads only CLIP-L's text tower, model/clip.py): this is the
evaluation's instrument, read with eval.py. The paper's prompt-fidelity metric, CLIP-T, reads
the whole CLIP ViT-L/14 (Radford et al., 2021): image and text, each projected into one shared
768-wide space, compared by cosine.

    image ─preprocess─> pixels (B, 3, 224, 224) ─conv 14×14, stride 14─> patches (B, 256, 1024)
          [class token; patches] + positions ─pre-LN─> 24 bidirectional blocks
          ─post-LN of the class token─> visual_projection ─> image embedding (B, 768)
    text  ─ids─> embeddings + positions ─> all 12 causal blocks ─final LN─> state at EOS
          ─text_projection─> text embedding (B, 768)
    CLIP-T = cos(image embedding, text embedding)

The image tower is built from the text tower's blocks (same LayerNorm, q/k/v/out projections
and quick_gelu MLP; ViT-L/14 was trained with quick_gelu too); only its attention drops the
causal mask. Module names are transformers' `CLIPModel` names, which are also the names in
the Hugging Face `openai/clip-vit-large-patch14` files users have (including transformers'
spelling `pre_layrnorm`), so loading is a strict assignment (model/checkpoint.py's
`clip_from_transformers`).
"""

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from model.attention import attention
from model.clip import CLIPAttention, CLIPEncoderLayer, CLIPTextConfig, CLIPTextModel, LayerNorm, eos_positions


# CLIP's image normalisation, from OpenAI's `clip/clip.py` `_transform` (the dataset statistics
# CLIP was trained with): x = (pixel/255 − mean) / std per RGB channel.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPVisionConfig:
    """CLIP ViT-L/14's image tower."""

    image_size: int = 224  # input side in pixels (square, after preprocessing)
    patch_size: int = 14  # the "/14": 16×16 = 256 patches of 14×14 pixels, plus the class token
    width: int = 1024  # token width D
    layers: int = 24  # transformer blocks (all of them run: CLIP-T reads the last one)
    heads: int = 16  # attention heads, 64 wide each
    mlp_width: int = 4096  # hidden width of each block's MLP (4·D)


class CLIPVisionAttention(CLIPAttention):
    """CLIPAttention without the causal mask: every patch attends to every patch."""

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, L, 64)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.out_proj(attention(q, k, v).transpose(1, 2).reshape(B, L, D))


class CLIPVisionEncoderLayer(CLIPEncoderLayer):
    """The text tower's pre-LN block with bidirectional attention."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__(cfg)
        self.self_attn = CLIPVisionAttention(cfg)


class CLIPModel(nn.Module):
    """CLIP ViT-L/14: text and image towers with their projections -> embeddings in one space."""

    def __init__(self, text_cfg: CLIPTextConfig, vision_cfg: CLIPVisionConfig, projection_dim: int = 768):
        super().__init__()
        self.text_config, self.vision_config = text_cfg, vision_cfg
        # The text tower is the very module tree SDXL's CLIP-L uses (text_model.embeddings...,
        # text_model.encoder.layers.N..., text_model.final_layer_norm); here it runs to the end.
        self.text_model = CLIPTextModel(text_cfg).text_model
        # Plain containers reproducing the checkpoint's names (vision_model.embeddings...).
        v = self.vision_model = nn.Module()
        v.embeddings = nn.Module()
        v.embeddings.class_embedding = nn.Parameter(torch.empty(vision_cfg.width))
        # Cutting the image into patches and embedding each is one strided convolution.
        v.embeddings.patch_embedding = nn.Conv2d(3, vision_cfg.width, vision_cfg.patch_size,
                                                 stride=vision_cfg.patch_size, bias=False)
        num_positions = (vision_cfg.image_size // vision_cfg.patch_size) ** 2 + 1  # patches + class token
        v.embeddings.position_embedding = nn.Embedding(num_positions, vision_cfg.width)
        v.pre_layrnorm = LayerNorm(vision_cfg.width)  # sic: transformers' spelling, the files' name
        v.encoder = nn.Module()
        v.encoder.layers = nn.ModuleList(CLIPVisionEncoderLayer(vision_cfg) for _ in range(vision_cfg.layers))
        v.post_layernorm = LayerNorm(vision_cfg.width)
        # Projections into the shared space, Linear without bias (y = x·Wᵀ).
        self.visual_projection = nn.Linear(vision_cfg.width, projection_dim, bias=False)
        self.text_projection = nn.Linear(text_cfg.width, projection_dim, bias=False)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) -> projected image embeddings (B, P), not normalised."""
        v = self.vision_model
        x = v.embeddings.patch_embedding(pixels.to(v.embeddings.class_embedding.dtype))  # (B, D, S/14, S/14)
        x = x.flatten(2).transpose(1, 2)  # (B, N, D): patches in row-major order
        cls = v.embeddings.class_embedding.expand(x.shape[0], 1, -1)
        # x_0 = [class; patches] + positions, then LayerNorm before the first block (CLIP's ln_pre)
        x = v.pre_layrnorm(torch.cat([cls, x], dim=1) + v.embeddings.position_embedding.weight)
        for layer in v.encoder.layers:
            x = layer(x)
        # The image is what the class token has gathered: post-LN(x_L[:, 0]) · W_visualᵀ
        return self.visual_projection(v.post_layernorm(x[:, 0]))

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> projected text embeddings (B, P), not normalised."""
        t = self.text_model
        x = t.embeddings.token_embedding(ids) + t.embeddings.position_embedding.weight[: ids.shape[1]]
        # PITFALL: unlike SDXL's conditioning (the penultimate state), CLIP's own text embedding
        # runs every block and the final LayerNorm, and reads the EOS token.
        for layer in t.encoder.layers:
            x = layer(x)
        x = t.final_layer_norm(x)
        eos_features = x[torch.arange(x.shape[0], device=x.device), eos_positions(ids).to(x.device)]  # (B, D)
        return self.text_projection(eos_features)


def clip_preprocess(image, size: int = 224) -> torch.Tensor:
    """CLIP's image preprocessing: a PIL image or (H, W, 3) uint8 array -> (3, size, size) float32.

    Resize the shortest side to `size` with bicubic filtering, cut the centre square, scale to
    [0, 1] and normalise with CLIP_MEAN / CLIP_STD. This is OpenAI's `_transform` as transformers'
    CLIPImageProcessor runs it (PIL's bicubic; the long side int(size·long/short); the crop's
    top-left corner rounded down), tested equal to it."""
    image = (image if isinstance(image, Image.Image) else Image.fromarray(image)).convert("RGB")
    w, h = image.size
    # The short side becomes `size`, the long one keeps the aspect ratio (truncated, as both references do).
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.resize((new_w, new_h), Image.BICUBIC)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    image = image.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, size, size)
    # x = (x − mean) / std
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]

