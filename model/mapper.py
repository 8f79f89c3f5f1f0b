"""CoCoIns: integer codes, the mapping network f, and pseudo-word insertion (paper section 3.2).

A user picks an integer code (`--code 42`). The code seeds a generator that draws a latent
`z ∈ R^c`, `z ~ N(0, I)` (eq. 3). The mapping network `f`, a small MLP, turns `z` into a
*pseudo-word* `w = f(z)`: one vector per SDXL text encoder (CLIP-L tokens are 768 wide, bigG
tokens 1280). The pseudo-word goes into the prompt's token embeddings, directly before the
concept word, as if the prompt had said "a [w] woman reading" (eq. 4). The same code gives the
same `w`, so the same person, in any prompt.

Symbols (the paper's):
    z        latent code (B, c)
    w        pseudo-word (B, D), one per text encoder
    e        token embeddings of a prompt, before positions and the transformer (B, L=77, D)
    i        index of the concept token in e (the pseudo-word is inserted there)
    ê        e with w inserted (eq. 4)

Contents, in the order a prompt meets them: `code_to_z`, the `Mapper` (`f`), `find_concept`,
`insert` / `insert_many` / `insert_subjects` (saving and loading: model/checkpoint.py).

Read next: losses.py (how f is trained), then step.py.
"""

import operator
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.errors import UserError


@dataclass
class MapperConfig:
    # c, the width of z. 512, as in StyleGAN's mapping network (the paper's model for f): two codes
    # drawn in 512 dimensions are nearly orthogonal (|cos| ~ 0.04), so every code is a distinct input.
    z_dim: int = 512
    # n, the Linear layers from z to a pseudo-word: n-1 shared hidden layers, then one output layer per
    # encoder. 4 rather than StyleGAN's 8: f only has to produce one token per encoder, not the styles
    # of a whole generator, and a shallow MLP trains quickly through the frozen SDXL.
    depth: int = 4
    # Width of the hidden layers. 1024 lies between c and the widest token (1280), so no layer is a
    # bottleneck; f then has about 4.7 M parameters, nothing next to SDXL's 3.5 B.
    hidden: int = 1024
    # Pseudo-word widths, one per text encoder, in the order the encoders are used. Read them from the
    # loaded encoders' token tables (SDXL: CLIP-L 768, bigG 1280); the defaults are SDXL's.
    token_widths: tuple[int, ...] = (768, 1280)
    # Hidden nonlinearity: "leaky_relu" (slope 0.2) as in StyleGAN's mapping network, or "gelu".
    activation: str = "leaky_relu"
    # The output layer: "layernorm", w = μ + g·σ⊙LayerNorm(Wh+b) (PseudoWordHead), or "none", w = μ + σ⊙(Wh+b),
    # the paper's plain MLP, whose words grew 100x a real token's spread in the toy world: more consistent, but
    # they drowned scene and gender. g: the word's loudness in real tokens' spreads (3-30: no gain; 100: the MLP's trade).
    norm: str = "layernorm"
    gain: float = 1.0


NORMS = ("layernorm", "none")
ACTIVATIONS = {"leaky_relu": lambda x: F.leaky_relu(x, 0.2), "gelu": F.gelu}


# -- codes ---------------------------------------------------------------------------------------


def code_to_z(code: int, c: int) -> Tensor:
    """The latent z (c,) of an integer code: the same float32 numbers on every machine and device."""
    try:
        # Any integer type (Python, NumPy) is a code; True, 1.5 or "42" are not.
        code = None if isinstance(code, bool) else operator.index(code)
    except TypeError:
        code = None
    if code is None or not 0 <= code < 2**63:
        raise UserError("a code must be a whole number from 0 to 2**63 - 1, e.g. --code 42")
    generator = torch.Generator(device="cpu").manual_seed(code)
    # z ~ N(0, I), seeded by the code (eq. 3).
    # PITFALL: float32 randn of 16+ numbers takes a vectorised AVX2 path on x86 CPUs and a scalar
    # path elsewhere (ARM, Apple), which differ in the last bit. Draw in float64 (one scalar path
    # everywhere) and round to float32, so a code means the same person on every machine.
    return torch.randn(c, generator=generator, dtype=torch.float64).to(torch.float32)


# -- the mapping network f -----------------------------------------------------------------------


def embedding_stats(table: Tensor) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and standard deviation (D,) of a token-embedding table (V, D)."""
    table = table.detach().float()
    return table.mean(dim=0), table.std(dim=0)


class PseudoWordHead(nn.Module):
    """Last layer of f for one text encoder: hidden features -> a pseudo-word shaped like a real token.

    `token_mean`, `token_std`: that encoder's token-table statistics, buffers a saved mapper carries
    (they never train). `norm`, `gain`: MapperConfig's."""

    def __init__(self, hidden: int, token_mean: Tensor, token_std: Tensor, norm: str = "layernorm", gain: float = 1.0):
        super().__init__()
        if norm not in NORMS or not gain > 0:
            raise ValueError(f"mapper norm must be one of {NORMS} and gain > 0, got {norm!r}, {gain!r}")
        self.norm, self.gain = norm, gain
        self.proj = nn.Linear(hidden, token_mean.numel())
        self.register_buffer("token_mean", token_mean.detach().clone().float())
        self.register_buffer("token_std", token_std.detach().clone().float())

    def forward(self, h: Tensor) -> Tensor:
        u = self.proj(h).float()
        if self.norm == "layernorm":
            # w = μ + g·σ ⊙ LayerNorm(W·h + b)   (μ, σ: per-dimension mean and std of the token table)
            # The normalisation pins (w − μ)/σ to unit mean square, so an untrained or early f gives a
            # vector with the spread of real tokens: it never blows up the prompt, and every code
            # still gives a different word (the paper notes f otherwise tends to ignore its input).
            u = self.gain * F.layer_norm(u, (self.token_mean.numel(),))
        # w = μ + σ ⊙ u   (norm "none": u = W·h + b, the paper's plain MLP output)
        return self.token_mean + self.token_std * u


class Mapper(nn.Module):
    """f: z (B, c) -> one pseudo-word (B, D_k) per text encoder (eq. 3)."""

    def __init__(self, config: MapperConfig, token_stats: Sequence[tuple[Tensor, Tensor]]):
        """`token_stats`: (mean, std) of each encoder's token table, from `embedding_stats`."""
        super().__init__()
        if config.depth < 1 or config.activation not in ACTIVATIONS:
            raise ValueError(f"mapper depth must be >= 1 and activation one of {sorted(ACTIVATIONS)}, got {config}")
        widths = tuple(mean.numel() for mean, _ in token_stats)
        if widths != tuple(config.token_widths):
            raise ValueError(f"token statistics of widths {widths} do not match the config's {tuple(config.token_widths)}")
        self.config = config
        self.act = ACTIVATIONS[config.activation]
        ins = [config.z_dim] + [config.hidden] * (config.depth - 1)
        self.layers = nn.ModuleList(nn.Linear(n_in, config.hidden) for n_in in ins[:-1])
        self.heads = nn.ModuleList(PseudoWordHead(ins[-1], mean, std, config.norm, config.gain) for mean, std in token_stats)
        for layer in [*self.layers, *(head.proj for head in self.heads)]:
            # He init for the leaky ReLU keeps the activations O(1) through the depth (PyTorch's
            # default shrinks them about 3x per layer); biases start at zero.
            nn.init.kaiming_normal_(layer.weight, a=0.2, nonlinearity="leaky_relu")
            nn.init.zeros_(layer.bias)

    def forward(self, z: Tensor) -> tuple[Tensor, ...]:
        h = z
        for layer in self.layers:
            h = self.act(layer(h))
        return tuple(head(h) for head in self.heads)


# -- where the pseudo-word goes ------------------------------------------------------------------


def find_concept(token_ids: Sequence[int], concept_ids: Sequence[int], *, word: str, prompt: str,
                 occurrence: int = 0) -> int:
    """Index of the concept word's first token at its `occurrence`-th appearance (0: the first).

    `token_ids`: the tokenized prompt (BOS, ..., EOS, padding); `concept_ids`: the word alone
    (`Tokenizer.encode(word)`). A word of several BPE tokens is matched whole, so the pseudo-word
    goes before all of it; `word` and `prompt` only name the problem in the error. (Matching is on
    ids: "boarder" would match inside "snowboarder"; such prompts are rare enough to accept.)"""
    ids = [int(t) for t in token_ids]
    concept_ids = [int(t) for t in concept_ids]
    if not concept_ids:
        raise UserError(f"the concept word {word!r} has no tokens; name a word of the prompt, e.g. --concept woman")
    n = len(concept_ids)
    # Position 0 is BOS, never a word.
    found = [p for p in range(1, len(ids) - n + 1) if ids[p:p + n] == concept_ids]
    if not found:
        raise UserError(
            f"the concept word {word!r} does not appear in the prompt {prompt!r} (within its first 75 tokens); "
            f"add it to the prompt or pass --concept with a word the prompt contains"
        )
    if occurrence >= len(found):
        raise UserError(
            f"{occurrence + 1} subjects are {word!r}, but the prompt {prompt!r} names {word!r} only {len(found)} "
            f"time(s) (within its first 75 tokens); give each subject its own {word!r} in the prompt"
        )
    return found[occurrence]


def insert(e: Tensor, w: Tensor, i: Tensor, eos_pos: Tensor) -> tuple[Tensor, Tensor]:
    """ê = insert(e, w, i) (eq. 4): w goes to position i, later tokens shift right by one.

    e (B, L, D) token embeddings; w (B, D); i (B,) insertion index (the concept token's, so
    1 <= i < eos_pos); eos_pos (B,) index of each prompt's EOS. Returns (ê (B, L, D), eos_hat (B,)).
    The sequence stays L long: the last padding token falls off the end. A prompt that already
    fills all 77 positions loses its last word instead (its concept too, if that was the last
    word), never the EOS. Differentiable in w and e."""
    B, L, D = e.shape
    if ((i < 1) | (i >= eos_pos)).any():
        raise ValueError(f"insert positions {i.tolist()} must lie after BOS and before the EOS at {eos_pos.tolist()}")
    # PITFALL: the EOS must survive, and moves with the shift: bigG's pooled output is read at
    # eos_hat, so a full prompt gives up its last word, not its EOS.
    eos_hat = (eos_pos + 1).clamp(max=L - 1)
    p = torch.arange(L, device=e.device)[None, :]  # (1, L) output positions
    i, eos_pos, eos_hat = i[:, None], eos_pos[:, None], eos_hat[:, None]
    # ê[p] = e[p] for p < i,  w for p = i,  e[p-1] for p > i,  and the EOS e[eos_pos] at eos_hat
    source = torch.where(p < i, p, p - 1)
    source = torch.where(p == eos_hat, eos_pos, source)
    shifted = e.gather(1, source[..., None].expand(B, L, D))
    e_hat = torch.where((p == i)[..., None], w.to(e.dtype)[:, None, :], shifted)
    return e_hat, eos_hat[:, 0]


def insert_many(e: Tensor, pairs: Sequence[tuple[Tensor, Tensor]], eos_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Insert several pseudo-words, each (w (B, D), i (B,)) with i its concept's index in the *original* e.

    Every pseudo-word ends up directly before its own concept token: after each insertion, the
    concepts at or after it have moved one to the right. Two pseudo-words for the same concept
    come out in the order given, both before it."""
    pending = [i for _, i in pairs]
    for k, (w, _) in enumerate(pairs):
        i = pending[k]
        e, eos_pos = insert(e, w, i, eos_pos)
        pending[k + 1:] = [j + (j >= i).long() for j in pending[k + 1:]]
    return e, eos_pos


def insert_subjects(e: Tensor, eos_pos: Tensor, ids: Tensor, tokenizer, subjects, prompts: Sequence[str]):
    """Insert pseudo-words before named concept words in a batch of tokenized prompts -> (ê, eos_hat).

    e (B, L, D), eos_pos (B,) from one encoder; ids (B, L) its token ids, on the CPU (positions are
    looked up without a device sync); `tokenizer` has `.encode(text)`; `subjects` is a list of
    (w, concept): w (D,) or (B, D), concept one word or one per prompt (a training batch mixes "man"
    and "woman"). Subjects of one word take its occurrences in order ("a man talking to another
    man": the first goes before the first "man", the second before the second)."""
    B, L = e.shape[:2]
    positions = [[] for _ in range(B)]  # per prompt: (index, concept length, word) of each subject
    for w, words in subjects:
        words = [words] * B if isinstance(words, str) else list(words)
        concept_ids = {word: tokenizer.encode(word) for word in set(words)}
        for b, word in enumerate(words):
            taken = sum(1 for _, _, other in positions[b] if other == word)  # earlier subjects of this word
            i = find_concept(ids[b].tolist(), concept_ids[word], word=word, prompt=prompts[b], occurrence=taken)
            positions[b].append((i, len(concept_ids[word]), word))
    for b, subject_positions in enumerate(positions):
        for i, n, word in subject_positions:
            # After insertion the concept starts at i + s (s: the pseudo-words inserted at or before
            # it, its own included) and must end before the EOS, which stops at L − 1: the tokens
            # pushed past it are cut, and a concept cut off would leave its pseudo-word on nothing.
            s = sum(1 for j, _, _ in subject_positions if j <= i)
            if i + s + n > L - 1:
                raise UserError(
                    f"the prompt {prompts[b]!r} is too long for {len(subject_positions)} pseudo-word(s): inserting "
                    f"them pushes the concept word {word!r} past CLIP's {L}-token limit, where it would be cut off; "
                    f"shorten the prompt or name {word!r} earlier in it")
    pairs = [(w.expand(B, -1), torch.tensor([positions[b][k][0] for b in range(B)], device=e.device))
             for k, (w, _) in enumerate(subjects)]
    return insert_many(e, pairs, eos_pos)
