"""What the toy world measures: the paper's metrics on the judge's readings, and what lies behind them.

Every row of the experiment is a set of generated images grouped by identity (a code, a person named in the
prompt, a dataset person) and read by the judge (toyworld/judge.py). `score` turns the readings into:

    Face Sim, Face Div     eval.py's, on the judge's embedding (the seven factors' probabilities)
    identity agreement     the share of a group's image pairs whose seven judged factors all agree
    agree_<factor>         the same, one factor at a time (which parts of a person a group holds)
    pair_div               1 − the mean cosine between images of different groups (how different two groups'
                           people are, whether or not each group is consistent)
    scene accuracy         the share of images whose judged scene is the prompt's (the toy CLIP-T)

and the words themselves (`word_stats`), the latent footprint of each factor (`factor_footprints`), how far a
word moves the context of the words after it (`context_bleed`), and how the codes' people spread over the
world's looks (`census`).

Read next: toyworld/report.py (the report these numbers fill).
"""

import random
from dataclasses import replace

import numpy as np
import torch

from eval import face_diversity, face_similarity
from losses import word_spread
from model.clip import EOS_ID
from model.mapper import code_to_z
from model.vae import AutoencoderKL
from toyworld import base, judge as judge_lib, world

CONCEPTS = ("man", "woman")
# Kept scores of a mapper are recomputed when the measures change (3: this module's census and named rows).
METRICS_VERSION = 3


def score(reading: dict, groups: list[list[int]], scenes: list[int]) -> dict:
    """The metrics above for judged images. `groups`: image indices per identity; `scenes`: each image's true scene."""
    emb, factors = reading["embedding"], reading["factors"]
    agreement, per_factor = [], {name: [] for name in judge_lib.IDENTITY}
    for g in groups:
        n = len(g)
        if n < 2:
            continue
        f = factors[g]
        same = f[:, None, :] == f[None, :, :]  # (n, n, 7): which factors two images agree in
        pairs = ~torch.eye(n, dtype=torch.bool)
        agreement.append(same.all(-1)[pairs].float().mean().item())  # all seven agree
        for k, name in enumerate(judge_lib.IDENTITY):
            per_factor[name].append(same[..., k][pairs].float().mean().item())
    label = torch.empty(len(emb), dtype=torch.long)
    for i, g in enumerate(groups):
        label[g] = i
    unit = torch.nn.functional.normalize(emb.double(), dim=1)
    between = label[:, None] != label[None, :]
    return {
        "face_sim": face_similarity([emb[g] for g in groups]),
        "face_div": face_diversity([emb[g] for g in groups]),
        "identity_agreement": float(np.mean(agreement)),
        "scene_accuracy": (reading["scene"] == torch.tensor(scenes)).float().mean().item(),
        **{f"agree_{name}": float(np.mean(v)) for name, v in per_factor.items()},
        "pair_div": 1 - (unit @ unit.T)[between].mean().item(),
    }


def score_generated(images: torch.Tensor, jobs: list[dict], judge: judge_lib.Judge) -> dict:
    """`score` for generated images grouped by (concept, code), plus concept accuracy (the judged gender is the
    prompt's) and, where jobs name their person (`truth`), the share of images that show exactly that person."""
    reading = judge.read(images)
    keys = sorted({(j["concept"], j["code"]) for j in jobs})
    groups = [[i for i, j in enumerate(jobs) if (j["concept"], j["code"]) == k] for k in keys]
    metrics = score(reading, groups, [world.SCENES.index(j["scene"]) for j in jobs])
    gender = torch.tensor([CONCEPTS.index(j["concept"]) for j in jobs])
    metrics["concept_accuracy"] = (reading["factors"][:, 0] == gender).float().mean().item()
    if all("truth" in j for j in jobs):
        truth = torch.tensor([j["truth"] for j in jobs])
        metrics["truth_agreement"] = (reading["factors"] == truth).all(dim=1).float().mean().item()
    return metrics


def census(images: torch.Tensor, jobs: list[dict], judge: judge_lib.Judge, factor: str = "shirt") -> dict:
    """How the groups' people spread over one factor's values: each group's most frequent judged value, counted
    over the groups, as shares (collapse shows as a few values taking most groups, where the world has them
    about uniform)."""
    k = list(world.FACTORS).index(factor)
    values = judge.read(images)["factors"][:, k]
    keys = list(dict.fromkeys((j["concept"], j["code"]) for j in jobs))
    modes = [int(values[[i for i, j in enumerate(jobs) if (j["concept"], j["code"]) == key]].mode().values)
             for key in keys]
    counts = np.bincount(modes, minlength=len(world.FACTORS[factor]))
    return {v: float(c / len(modes)) for v, c in zip(world.FACTORS[factor], counts)}


def dataset_census(truth: list[dict], factor: str = "shirt") -> dict:
    """The world's own shares of a factor's values over its people (one vote per person)."""
    people = {t["identity"]: t[factor] for t in truth}
    return {v: sum(x == v for x in people.values()) / len(people) for v in world.FACTORS[factor]}


@torch.no_grad()
def factor_footprints(vae: AutoencoderKL, pairs: int = 200, seed: int = 7) -> dict:
    """What L_con can see of each factor: the mean squared distance over every latent element (losses.py's
    l2, reduction "all") between the UNet's latents of two renders of one person in one placement
    that differ in that factor alone; "everything", two random people in one placement, for scale."""
    rng = random.Random(seed)
    everyone = world.draw_identities(int(np.prod([len(v) for v in world.FACTORS.values()])), rng)
    a, b = {f: [] for f in [*world.FACTORS, "everything"]}, {f: [] for f in [*world.FACTORS, "everything"]}
    for _ in range(pairs):
        who, at = rng.choice(everyone), world.draw_placement(rng)
        picture = world.render(who, at)[0]
        for f, values in world.FACTORS.items():
            other = replace(who, **{f: rng.choice([v for v in range(len(values)) if v != getattr(who, f)])})
            a[f].append(picture)
            b[f].append(world.render(other, at)[0])
        a["everything"].append(picture)
        b["everything"].append(world.render(rng.choice(everyone), at)[0])

    def latents(images):
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return base.encode_means(vae, x) * base.SCALING_FACTOR

    return {f: (latents(a[f]) - latents(b[f])).pow(2).mean().item() for f in a}


def mapper_words(mapper, codes) -> torch.Tensor:
    """The CLIP-L pseudo-words (N, D) of `codes`."""
    return mapper(torch.stack([code_to_z(c, mapper.config.z_dim) for c in codes]))[0]


@torch.no_grad()
def word_stats(words: torch.Tensor, token_mean: torch.Tensor, token_std: torch.Tensor,
               spread_words: torch.Tensor | None = None) -> dict:
    """CLIP-L words (N, D) standardised, u = (w − μ)/σ, by the token table's statistics:
    w_cos, the mean cosine between different words' u (near 1: every code the same word, near 0: unrelated);
    w_rms, the mean root mean square of u (1: a real token's spread, what the output LayerNorm pins it to);
    w_dims, the effective number of directions `spread_words` (default: `words`) vary in (1 / word_spread)."""
    u = (words - token_mean) / token_std
    unit = torch.nn.functional.normalize(u, dim=1)
    i, j = torch.triu_indices(len(u), len(u), offset=1)
    spread = u if spread_words is None else (spread_words - token_mean) / token_std
    return {"w_cos": (unit @ unit.T)[i, j].mean().item(), "w_rms": u.pow(2).mean(dim=1).sqrt().mean().item(),
            "w_dims": 1 / word_spread(spread).item()}  # ≥ 1, since word_spread ≤ 1


@torch.no_grad()
def mapper_word_stats(mapper, codes: list[int], spread_codes: int = 256) -> dict:
    """`word_stats` of a mapper's words for `codes`, its directions counted over codes 0 … spread_codes−1."""
    head = mapper.heads[0]
    return word_stats(mapper_words(mapper, codes), head.token_mean, head.token_std,
                      mapper_words(mapper, range(spread_codes)))


@torch.no_grad()
def context_bleed(model, mapper, codes: list[int], scenes=world.SCENES) -> dict:
    """How far one word inserted before the concept moves the UNet's context of the words after it.

    For each evaluation prompt ("a photo of a woman on the beach"), the relative change
    |c'_k − c_k| / |c_k| of the context vectors c_k of the concept word, the scene words and the
    EOS, when a word is inserted before the concept (c'_k: the same words, as many positions later
    as the word has tokens), averaged over words and prompts. Three references: a real world word
    the captions put there (the skin words), a pseudo-word of the trained mapper, and, for scale,
    changing the scene itself (the same positions, a different scene phrase of as many tokens)."""
    def shift(prompt):
        """The plain prompt's context (L, D) and the positions from its concept word to its EOS."""
        ids = model.tok_l([prompt])[0].tolist()
        i, n = ids.index(model.tok_l.encode("woman")[0]), ids.index(EOS_ID)
        return model.encode_prompt([prompt])[0][0], list(range(i, n + 1))

    def rel(c_new, c_old, old_positions, offset):
        new = c_new[[k + offset for k in old_positions]]
        return ((new - c_old[old_positions]).norm(dim=-1) / c_old[old_positions].norm(dim=-1)).mean().item()

    real, pseudo, scene = [], [], []
    for s, sc in enumerate(scenes):
        prompt = world.prompt("woman", sc)
        c, after = shift(prompt)
        for word in world.SKIN_WORDS.values():
            with_word = shift(prompt.replace("woman", f"{word} woman"))[0]
            real.append(rel(with_word, c, after, len(model.tok_l.encode(word))))
        for code in codes:
            w_l, w_g = mapper(code_to_z(code, mapper.config.z_dim)[None])
            pseudo.append(rel(model.encode_prompt([prompt], [(w_l[0], w_g[0], "woman")])[0][0], c, after, 1))
        other = world.prompt("woman", scenes[(s + 1) % len(scenes)])
        c_other, after_other = shift(other)
        if len(after_other) == len(after):  # the same positions hold the other scene's words
            scene.append(rel(c_other, c, after, 0))
    return {"real_word": float(np.mean(real)), "pseudo_word": float(np.mean(pseudo)),
            "other_scene": float(np.mean(scene))}
