"""The paper's evaluation (section 4.2): Face Sim, Face Div, CLIP-T.

Symbols: an identity k has images whose face embeddings e_{k,1}, …, e_{k,n_k} are L2-normalised.

    Face Sim = mean_k  mean_{i<j} cos(e_{k,i}, e_{k,j})          consistency within an identity
    Face Div = 1 − mean_{k<l} cos(ē_k, ē_l),  ē_k = mean_i e_{k,i}   diversity between identities

PITFALL: the paper defines Face Div as "the average pairwise similarity between identities" yet
calls it higher-is-better and reports 0.992 for CelebA; only 1 − similarity fits both, so that is
what is computed here.
"""

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor


def face_similarity(groups: list[Tensor]) -> float:
    """Face Sim: per identity (N_k, D), the mean cosine over its image pairs; then the mean over identities.

    Identities with fewer than two images have no pair and are left out; NaN if none has two."""
    scores = []
    for e in groups:
        if len(e) < 2:
            continue
        e = F.normalize(e.double(), dim=1)
        cos = e @ e.T
        i, j = torch.triu_indices(len(e), len(e), offset=1)
        scores.append(cos[i, j].mean())
    return float(torch.stack(scores).mean()) if scores else float("nan")


def face_diversity(groups: list[Tensor]) -> float:
    """Face Div: 1 − the mean cosine between identity means ē_k (identities without images left out)."""
    means = [F.normalize(e.double(), dim=1).mean(dim=0) for e in groups if len(e)]
    if len(means) < 2:
        return float("nan")
    cos = [F.cosine_similarity(a, b, dim=0) for a, b in itertools.combinations(means, 2)]
    return float(1 - torch.stack(cos).mean())
