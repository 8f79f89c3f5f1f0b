"""SDXL's two text encoders: the CLIP tokenizer and the text transformers.

SDXL reads a prompt twice, with two CLIP text towers trained by others:

    CLIP ViT-L/14 (OpenAI)        12 layers,  768 wide, 12 heads, quick_gelu
    OpenCLIP ViT-bigG/14 (LAION)  32 layers, 1280 wide, 20 heads, gelu, + text_projection

Both share one tokenizer (the BPE of OpenAI's CLIP) and one shape of transformer: a stack
of pre-LayerNorm blocks with causal self-attention over 77 tokens. SDXL conditions its UNet
on the *penultimate* hidden states of both (concatenated to 768 + 1280 = 2048 channels) and
on bigG's pooled vector (its final LayerNorm at the end-of-text token, times text_projection).

    text --Tokenizer--> ids (B, 77) --embed--> e (B, 77, D) --forward--> penultimate, pooled

CoCoIns works between `embed` and `forward`: it inserts pseudo-words into the token
embeddings e and moves the end-of-text position (model/mapper.py), so `forward` takes token
embeddings and the EOS position, not ids.

References: OpenAI's CLIP (`clip/simple_tokenizer.py`, `clip/model.py`), open_clip
(`tokenizer.py`, `transformer.py`), and sgm's `FrozenCLIPEmbedder` / `FrozenOpenCLIPEmbedder2`
(`sgm/modules/encoders/modules.py`), which define what SDXL takes from each encoder.
Module names are the official checkpoint's: CLIP-L keeps transformers' names
(`text_model.encoder.layers.N.self_attn.q_proj`), bigG keeps OpenCLIP's
(`transformer.resblocks.N.attn.in_proj_weight`), so loading is a prefix split.

Read next: model/unet.py (the denoiser these embeddings condition).
"""

import gzip
import html
import os
import unicodedata
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tokenizers import Regex
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import models, pre_tokenizers
from torch import nn

from model.attention import attention
from model.errors import UserError

# ----------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------

CONTEXT_LENGTH = 77  # tokens per prompt, BOS and EOS included
BOS_ID = 49406  # <|startoftext|>
EOS_ID = 49407  # <|endoftext|>
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# The vocabulary of OpenAI's CLIP, as shipped in the open_clip_torch wheel (MIT license).
BUNDLED_VOCAB = os.path.join(os.path.dirname(__file__), os.pardir, "weights", "bpe_simple_vocab_16e6.txt.gz")
# The file's line 0 is a version header, then 262,144 merges in rank order. CLIP uses the
# first 48,894 (a 49,152-token design less 256 bytes and 2 control tokens; OpenAI's code
# reads lines 1..49152-256-2), giving 256 + 256 + 48,894 + 2 = 49,408 ids.
NUM_MERGES = 49152 - 256 - 2
# How the two encoders fill the tokens after EOS. PITFALL: they differ. CLIP-L (transformers'
# tokenizer in sgm) pads with <|endoftext|>; bigG (open_clip's tokenizer) pads with id 0, '!'.
PAD_IDS = {"eos": EOS_ID, "!": 0}

# CLIP's pre-tokenizer: contractions, runs of letters, single digits, runs of other symbols;
# whitespace separates and is dropped. (OpenAI's pattern also matches its special-token
# strings; we leave them out so prompts are always plain text, see `Tokenizer`.)
# open_clip compiles it with IGNORECASE, which on lower-cased text only matters for U+0345
# (it case-folds to a letter and is silently dropped there); we compile it as written.
SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

# Curly quotes -> straight quotes, the one ftfy repair that changes everyday typed prompts
# (copied text: "woman’s"). The character sets are ftfy's `uncurl_quotes`.
_STRAIGHT_QUOTES = str.maketrans(dict.fromkeys("\u02bc\u2018\u2019\u201a\u201b", "'") | dict.fromkeys("\u201c\u201d\u201e\u201f", '"'))


def clean_text(text: str) -> str:
    """CLIP's prompt cleaning: HTML entities decoded twice, quotes straightened, NFC,
    whitespace collapsed, lower-cased.

    PITFALL: the original also runs ftfy.fix_text first. We do not depend on ftfy; we do the
    parts of it that matter for prompts people type (curly quotes, NFC composition) and skip
    the rest: mojibake repair ("cafÃ©"), full-width forms ("ＡＢＣ"), Latin ligatures ("ﬁ"),
    and ftfy's own extra round of HTML decoding (so "&amp;amp;amp;" ends as "&amp;" here and
    "&" there). tests/test_tokenizer.py pins each of these divergences."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text.translate(_STRAIGHT_QUOTES))
    return " ".join(text.split()).lower()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters.

    BPE works on strings; this lets every byte sequence (any UTF-8 text, emoji included) be a
    string of visible characters, so no input is ever unknown. Printable Latin-1 bytes map to
    themselves; the other 68 go, in byte order, to chr(256), chr(257), ... Token ids 0..255
    are these characters in this order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


class Tokenizer:
    """CLIP's byte-level BPE: prompts -> (B, 77) token ids [BOS, ..., EOS, pad, ...].

    Built on the `tokenizers` library (a Rust BPE), configured to reproduce the tokenizer SDXL
    was trained with (open_clip's copy of OpenAI's): our `clean_text`, CLIP's split pattern,
    bytes mapped to characters, then BPE with "</w>" marking the end of each word.

    Prompts are plain text: a literal "<|endoftext|>" in a prompt is tokenized as characters,
    never as the control token, so EOS_ID appears only where the tokenizer puts it."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_id: int):
        if vocab.get(BOS) != BOS_ID or vocab.get(EOS) != EOS_ID:
            raise UserError(f"this CLIP vocabulary does not map {BOS} to {BOS_ID} and {EOS} to {EOS_ID}; use SDXL's tokenizer files")
        self.pad_id = pad_id
        self._bpe = _HFTokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
        self._bpe.pre_tokenizer = pre_tokenizers.Sequence([
            # invert=True keeps the pattern's matches as words and drops what lies between.
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            # Each word's UTF-8 bytes -> bytes_to_unicode() characters (no further splitting).
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    @classmethod
    def bundled(cls, pad: str) -> "Tokenizer":
        """The tokenizer from weights/bpe_simple_vocab_16e6.txt.gz; pad is "eos" (CLIP-L) or "!" (bigG)."""
        if pad not in PAD_IDS:
            raise ValueError(f"pad must be one of {', '.join(PAD_IDS)}, not {pad!r}")
        if not os.path.isfile(BUNDLED_VOCAB):
            raise UserError(f"the CLIP vocabulary {BUNDLED_VOCAB} is missing; restore it with `git checkout weights/`")
        with gzip.open(BUNDLED_VOCAB, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
        # ids: 256 byte characters, the same with "</w>" (a byte that ends a word), one per
        # merge in rank order, then BOS and EOS (= 49408 in all).
        chars = list(bytes_to_unicode().values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS, EOS]
        return cls({t: i for i, t in enumerate(tokens)}, merges, PAD_IDS[pad])

    def encode(self, text: str) -> list[int]:
        """Token ids of one cleaned prompt, without BOS/EOS and without truncation."""
        return self._bpe.encode(clean_text(text), add_special_tokens=False).ids

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(B, 77) LongTensor: BOS, the prompt's tokens, EOS, then the pad id."""
        if isinstance(prompts, str):  # a string would silently become one row per character
            raise TypeError("Tokenizer takes a list of prompts; wrap a single prompt in a list")
        encodings = self._bpe.encode_batch([clean_text(p) for p in prompts], add_special_tokens=False)
        ids = torch.full((len(prompts), CONTEXT_LENGTH), self.pad_id, dtype=torch.long)
        for row, enc in zip(ids, encodings):
            # PITFALL: a long prompt loses its tail, never its EOS (pooled output is read there).
            tokens = [BOS_ID, *enc.ids[: CONTEXT_LENGTH - 2], EOS_ID]
            row[: len(tokens)] = torch.tensor(tokens)
        return ids


def eos_positions(ids: torch.Tensor) -> torch.Tensor:
    """(B,) index of the first EOS in each row of (B, L) ids.

    PITFALL: the *first* one: CLIP-L's padding is EOS too. (sgm takes `ids.argmax(-1)`, which
    is the same thing since EOS is the largest id and argmax returns the first maximum.)"""
    return (ids == EOS_ID).int().argmax(dim=1)


# ----------------------------------------------------------------------------------------
# Text transformers
# ----------------------------------------------------------------------------------------

@dataclass
class CLIPTextConfig:
    """CLIP ViT-L/14's text transformer, SDXL's first text encoder."""

    vocab_size: int = 49408  # BPE ids: 256 bytes, 256 word-final bytes, 48,894 merges, BOS, EOS
    context_length: int = CONTEXT_LENGTH  # rows of the positional embedding
    width: int = 768  # token width D
    layers: int = 12  # transformer blocks (SDXL uses the output of the second to last)
    heads: int = 12  # attention heads, 64 wide each
    mlp_width: int = 3072  # hidden width of each block's MLP (4·D)


@dataclass
class OpenCLIPTextConfig(CLIPTextConfig):
    """OpenCLIP ViT-bigG/14's text transformer, SDXL's second text encoder."""

    width: int = 1280
    layers: int = 32
    heads: int = 20
    mlp_width: int = 5120
    projection_dim: int = 1280  # width P of the pooled vector (columns of text_projection)


class TextOutput(NamedTuple):
    penultimate: torch.Tensor  # (B, L, D) hidden states entering the last block, no final LayerNorm
    pooled: torch.Tensor | None  # (B, P) bigG's projected EOS feature; None for CLIP-L


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the model's dtype (bf16 statistics over 1280
    channels lose precision), returned in the input's dtype."""

    def forward(self, x):
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


def causal_self_attention(q, k, v, heads: int):
    """Multi-head attention of each token over itself and the tokens before it; (B, L, D) in and out."""
    B, L, D = q.shape
    q, k, v = (t.view(B, L, heads, D // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, 64)
    # PITFALL: causal mask only. CLIP never masks padding: tokens after EOS cannot affect the
    # tokens before them anyway, and SDXL was trained on the padded positions as computed here.
    x = attention(q, k, v, is_causal=True)
    return x.transpose(1, 2).reshape(B, L, D)


# --- CLIP ViT-L/14 blocks, transformers' names ---


class CLIPAttention(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        return self.out_proj(causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        x = self.fc1(x)
        # quick_gelu(x) = x·σ(1.702·x): OpenAI trained CLIP with this approximation of GELU,
        # and the weights expect it (exact GELU here shifts every hidden state).
        return self.fc2(x * torch.sigmoid(1.702 * x))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(cfg.width)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        # Pre-LayerNorm residual block: x += attn(LN(x)); x += mlp(LN(x)).
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


# --- OpenCLIP ViT-bigG/14 blocks, OpenCLIP's names ---


class OpenCLIPAttention(nn.Module):
    """torch.nn.MultiheadAttention's parameters: q, k, v projections fused into one matrix."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))  # rows: q | k | v
        self.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(causal_self_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_width)
        self.c_proj = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        # bigG was trained with exact (erf) GELU, unlike CLIP-L's quick_gelu.
        return self.c_proj(F.gelu(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.width)
        self.attn = OpenCLIPAttention(cfg)
        self.ln_2 = LayerNorm(cfg.width)
        self.mlp = OpenCLIPMLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


# --- the two encoders ---


class CLIPTextModel(nn.Module):
    """CLIP ViT-L/14 text encoder -> penultimate hidden states (B, L, 768)."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        # Plain containers whose only job is to reproduce the checkpoint's names
        # (text_model.embeddings.token_embedding.weight, text_model.encoder.layers.N...).
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.text_model.embeddings.position_embedding = nn.Embedding(cfg.context_length, cfg.width)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))
        # Part of the checkpoint, unused by SDXL: it normalizes the last layer's output.
        self.text_model.final_layer_norm = LayerNorm(cfg.width)

    def embed(self, ids):
        """(B, L) ids -> (B, L, D) token embeddings (the dictionary lookup, no positions)."""
        return self.text_model.embeddings.token_embedding(ids)

    def forward(self, token_embeds, eos_pos) -> TextOutput:
        """Token embeddings (B, L, D) -> TextOutput(penultimate, None).

        `eos_pos` is taken for a call signature shared with bigG; CLIP-L's pooled output is
        not used by SDXL, so it is not computed."""
        L = token_embeds.shape[1]
        pos = self.text_model.embeddings.position_embedding.weight[:L]
        # Inputs take the model's dtype: float32 pseudo-words may meet a bfloat16 encoder.
        x = token_embeds.to(pos.dtype) + pos
        # PITFALL: SDXL takes the penultimate hidden state (transformers' hidden_states[-2]):
        # the input of the last layer, with no final LayerNorm. So the last layer never runs.
        for layer in self.text_model.encoder.layers[:-1]:
            x = layer(x)
        return TextOutput(x, None)


class OpenCLIPTextModel(nn.Module):
    """OpenCLIP ViT-bigG/14 text encoder -> penultimate hidden states (B, L, 1280) and pooled (B, 1280)."""

    def __init__(self, cfg: OpenCLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = nn.Module()  # container for the checkpoint's name transformer.resblocks.N
        self.transformer.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg) for _ in range(cfg.layers))
        self.ln_final = LayerNorm(cfg.width)
        # Stored as P with pooled = x @ P (not as a Linear's weight, which would be Pᵀ).
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim))

    def embed(self, ids):
        """(B, L) ids -> (B, L, D) token embeddings (the dictionary lookup, no positions)."""
        return self.token_embedding(ids)

    def forward(self, token_embeds, eos_pos) -> TextOutput:
        """Token embeddings (B, L, D) and EOS positions (B,) -> TextOutput(penultimate, pooled).

        `eos_pos` is where the pooled feature is read: after CoCoIns inserts pseudo-words the
        EOS has moved right, and the caller says where to."""
        L = token_embeds.shape[1]
        x = token_embeds.to(self.positional_embedding.dtype) + self.positional_embedding[:L]
        *blocks, last = self.transformer.resblocks
        for block in blocks:
            x = block(x)
        # PITFALL: the UNet's context is the penultimate state (no ln_final) ...
        penultimate = x
        # ... while the pooled vector comes from the last block: pooled = ln_final(x_L)[eos] @ P.
        x = self.ln_final(last(x))
        eos_features = x[torch.arange(x.shape[0], device=x.device), eos_pos]  # (B, D)
        return TextOutput(penultimate, eos_features @ self.text_projection)


# ----------------------------------------------------------------------------------------
# CLIP ViT-L/14 whole: the image tower and both projections (CLIP-T, eval.py)
# ----------------------------------------------------------------------------------------
#
# SDXL only reads CLIP-L's text tower (above). The paper's prompt-fidelity metric, CLIP-T, reads
# the whole CLIP ViT-L/14 (Radford et al., 2021): image and text, each projected into one shared
# 768-wide space, compared by cosine.
#
#   image ─preprocess─> pixels (B, 3, 224, 224) ─conv 14×14, stride 14─> patches (B, 256, 1024)
#         [class token; patches] + positions ─pre-LN─> 24 bidirectional blocks
#         ─post-LN of the class token─> visual_projection ─> image embedding (B, 768)
#   text  ─ids─> embeddings + positions ─> all 12 causal blocks ─final LN─> state at EOS
#         ─text_projection─> text embedding (B, 768)
#   CLIP-T = cos(image embedding, text embedding)
#
# The image tower is built from the text tower's blocks (same LayerNorm, q/k/v/out projections
# and quick_gelu MLP; ViT-L/14 was trained with quick_gelu too); only its attention drops the
# causal mask. Module names are transformers' `CLIPModel` names, which are also the names in
# the Hugging Face `openai/clip-vit-large-patch14` files users have (including transformers'
# spelling `pre_layrnorm`), so loading is a strict assignment (see `clip_from_transformers`).

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
    import numpy as np
    from PIL import Image

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

