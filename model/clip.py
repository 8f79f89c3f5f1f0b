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

# -- Tokenizer -------------------------------------------------------------------------------

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


# -- Text transformers -----------------------------------------------------------------------

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
