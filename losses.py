"""The CoCoIns training objective (paper section 3.3, eq. 7-9).

Each training image gives a triplet of x̂₀ estimates (model/ddim.py `x0_from_eps`) that differ
only in prompt, pseudo-word and noise (step.py builds them, eq. 5-6):

    x̂*   anchor:   caption P1 + pseudo-word of z1, noise ε1
    x̂+   positive: caption P2 + pseudo-word of z1, noise ε2
    x̂-   negative: caption P1 + pseudo-word of z2, noise ε1
    x̂1   P1 without pseudo-word, noise ε1;   x̂2   P2 without pseudo-word, noise ε2

all latents (B, C, h, w), and the subject mask m (B, 1, h, w) in [0, 1] at latent resolution.

    d_m(x, y) = d(m·x, m·y)                                    masked distance
    L_con  = d_m(x̂*, x̂+) + λ_neg / d_m(x̂*, x̂-)                 (eq. 7)
          (or d_m(x̂*, x̂+) − λ_neg·d_m(x̂*, x̂-), Table 3's "subtraction" ablation)
    λ_neg  = γ·(k/K)^β                                         k of K training steps
    L_back = d_m̃(x̂*, x̂1) + d_m̃(x̂+, x̂2) + d_m̃(x̂-, x̂1),  m̃ = 1 − m   (eq. 8)
    L      = λ_con·L_con + λ_back·L_back                        (eq. 9)

The anchor is pulled towards the positive (same code, other caption and noise: the same person)
and pushed from the negative (other code, same caption and noise: another person), inside the
subject only; outside it, all three must keep the background the plain prompt would give.

Reduction: each distance is a mean over one sample's C·h·w elements (the mask zeroes, it does not
re-normalise: d(m·x, m·y) literally), or with mask_reduction="area" the sum over those elements
divided by the mask's area C·Σm (a small subject then weighs as much as a large one); each term is
computed per sample (the reciprocal too) and then averaged over the batch, so one easy negative
cannot hide a collapsed one.

Read next: step.py (the training step that builds the triplets and calls these losses).
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from model.errors import UserError


@dataclass
class LossConfig:
    # Distance d: "l2" (mean squared error) or "l1" (mean absolute error). l2 by default: it is the
    # geometry SDXL was trained in (an MSE on ε, so x̂₀ errors are Gaussian-like), and it is smooth
    # at zero, where the positive term drives d_m(x̂*, x̂+).
    distance: str = "l2"
    # γ, the final weight of the negative term, chosen in the toy world (toyworld/RESULTS-trained-text.md, "Open
    # choices"), whose text encoders, like SDXL's, keep the words after an inserted word readable:
    # there γ = 1e-5 ... 1e-1 all keep the scene, and Face Sim grows with γ up to 1e-2. With random,
    # frozen text encoders (toyworld/RESULTS-frozen-text.md) every γ above 1e-4 lost the scene: a
    # pseudo-word rewrote the whole prompt. The masked distances (mean over all elements, subject
    # ~40 % of the latent) were 0.003-0.04; the reciprocal's scale follows the mask's area, so a much
    # smaller subject (a face in a wide shot) may want a smaller γ, or mask_reduction "area" (below).
    gamma: float = 1e-2
    # β, the shape of the ramp λ_neg = γ·(k/K)^β. The paper gives none; 1 (linear) is the plainest
    # increasing schedule: no negative push at the start, when f's words are still random, the
    # full γ at the end.
    beta: float = 1.0
    # λ_con and λ_back: equal weights, the neutral choice; the paper's Table 4 shows both terms matter.
    lambda_con: float = 1.0
    lambda_back: float = 1.0
    # ε in λ_neg / (d + ε): guards the reciprocal against d = 0 (anchor and negative identical).
    # 10⁻⁴ is far below the 10⁻² of real distances, so it changes nothing there, and caps the term
    # at λ_neg/ε instead of infinity.
    eps: float = 1e-4
    # The negative term: "reciprocal", λ_neg / d_m(x̂*, x̂-) (eq. 7), or "subtract", −λ_neg·d_m(x̂*, x̂-),
    # the form the paper's Table 3 rejects ("Pos+Neg as a subtraction"); kept to rerun that ablation.
    negative: str = "reciprocal"
    # The mask of L_con: "subject", the subject mask m (eq. 7), or "none", m = 1 everywhere (Table 4,
    # "without mask"). With "none", m̃ = 1 − m = 0, so L_back is zero whatever λ_back is.
    mask: str = "subject"
    # How a masked distance averages: "all", over every one of a sample's C·h·w elements, as
    # d(m·x, m·y) reads; "area", over the C·Σm elements the mask covers. The paper does not say;
    # "all" is its formula taken literally. Toy world: "area" acted as a weaker γ (a larger distance
    # in the reciprocal) and lost to "all" at γ = 1e-2 and 1e-3 (toyworld/RESULTS-trained-text.md).
    mask_reduction: str = "all"
    # λ_spread, the weight of `word_spread` (not in the paper; 0 = off). In the toy world every trained
    # mapper's words varied in only ~2 directions (from ~35 untrained), whatever γ, norm or schedule;
    # λ_spread = 10 spread them over ~5, with no gain in consistency (toyworld/RESULTS-trained-text.md, point 3).
    lambda_spread: float = 0.0
    # The unit of γ: "absolute", λ_neg = γ·(k/K)^β as the paper writes it; or "d_neg", γ in units of D², D the
    # mean d_m(x̂*, x̂-) over the run's first steps (step.py's GammaScale), so that the reciprocal's push
    # γ·D²/d² asks the same of any model, whatever distances its x̂₀ estimates lie at. The push of λ/d
    # scales as λ/d²: a γ tuned where d ~ 0.01 is a hundred times stronger where d ~ 0.001. Measured in the
    # toy world, "absolute" stays the default: the best γ stayed at 1e-2 on two UNet widths whose d_neg over
    # the first 20 steps differ 4-fold (at γ = 1e-4), and D turned out to measure the untrained mapper's
    # spread (codes not yet apart, D ~ 1e-3), not the model's distances (toyworld/RESULTS.md, experiment.py's
    # GAMMAS). README, "Choosing γ": what to read in log.jsonl instead.
    gamma_unit: str = "absolute"


# -- distances -----------------------------------------------------------------------------------


def _l2(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).pow(2).flatten(1).mean(dim=1)


def _l1(x: Tensor, y: Tensor) -> Tensor:
    return (x - y).abs().flatten(1).mean(dim=1)


DISTANCES = {"l2": _l2, "l1": _l1}
NEGATIVES = ("reciprocal", "subtract")
MASKS = ("subject", "none")
MASK_REDUCTIONS = ("all", "area")
GAMMA_UNITS = ("absolute", "d_neg")


def distance(x: Tensor, y: Tensor, name: str = "l2") -> Tensor:
    """d(x, y) per sample (B,), a mean over all other dimensions, computed in float32."""
    if name not in DISTANCES:
        raise UserError(f"unknown distance {name!r}; choose one of {', '.join(DISTANCES)}")
    # The x̂₀ estimates may come out of a bfloat16 UNet; the reciprocal of a small bf16 distance
    # would be coarse, so distances are always float32.
    return DISTANCES[name](x.float(), y.float())


def masked_distance(x: Tensor, y: Tensor, m: Tensor, name: str = "l2", reduction: str = "all") -> Tensor:
    """d_m(x, y) = d(m·x, m·y) per sample (B,); m (B, 1, h, w) is broadcast over channels.

    reduction "all": the mean over all C·h·w elements; "area": the sum over them divided by the
    mask's area C·Σm (at least one element, so an empty mask gives 0, not 0/0)."""
    m = m.float()
    d = distance(m * x.float(), m * y.float(), name)
    if reduction == "all":
        return d
    if reduction != "area":
        raise UserError(f"unknown mask reduction {reduction!r}; choose one of {', '.join(MASK_REDUCTIONS)}")
    # d_m = Σ d(m·x, m·y) / (C·Σm) = mean_all · (C·h·w) / (C·Σm)
    elements = x[0].numel()
    area = m.expand_as(x).flatten(1).sum(dim=1)
    return d * elements / area.clamp(min=1.0)


# -- the contrastive term L_con ------------------------------------------------------------------


def lambda_neg(k: int, K: int, gamma: float, beta: float) -> float:
    """λ_neg = γ·(k/K)^β, the weight of the negative term at step k of K (k past K stays at γ)."""
    if K <= 0:
        raise ValueError(f"the total number of steps K must be positive, got {K}")
    return gamma * (min(max(k, 0), K) / K) ** beta


def _contrastive_terms(x_anchor, x_pos, x_neg, m, dist, eps, negative="reciprocal", reduction="all"):
    """(mean d_m(x̂*, x̂+), the unweighted negative term, mean d_m(x̂*, x̂-)) over the batch.

    The negative term is the mean of 1/(d_m(x̂*, x̂-) + ε) ("reciprocal") or of −d_m(x̂*, x̂-)
    ("subtract"), so that L_con = l_pos + λ_neg·l_neg either way."""
    d_pos = masked_distance(x_anchor, x_pos, m, dist, reduction)
    d_neg = masked_distance(x_anchor, x_neg, m, dist, reduction)
    # PITFALL: the reciprocal, not a subtraction (paper Table 3): −d_neg is unbounded below and
    # rewards pushing one pair ever further apart; 1/d_neg rewards every pair leaving zero.
    if negative == "reciprocal":
        l_neg = (1.0 / (d_neg + eps)).mean()
    elif negative == "subtract":
        l_neg = -d_neg.mean()
    else:
        raise UserError(f"unknown negative term {negative!r}; choose one of {', '.join(NEGATIVES)}")
    return d_pos.mean(), l_neg, d_neg.mean()


# -- the background term L_back ------------------------------------------------------------------


def background_loss(x_anchor, x_pos, x_neg, x1, x2, m_bg, dist: str = "l2", reduction: str = "all") -> Tensor:
    """L_back = d_m̃(x̂*, x̂1) + d_m̃(x̂+, x̂2) + d_m̃(x̂-, x̂1)   (eq. 8), averaged over the batch.

    x̂1 and x̂2 are the predictions without pseudo-words for the same noisy latents (the anchor's
    and negative's ε1, the positive's ε2); m_bg = m̃ = 1 − m."""
    # Each sample with a pseudo-word is compared with the plain prompt that shares its noise.
    d = (masked_distance(x_anchor, x1, m_bg, dist, reduction)
         + masked_distance(x_pos, x2, m_bg, dist, reduction)
         + masked_distance(x_neg, x1, m_bg, dist, reduction))
    return d.mean()


# -- the spread of the codes' words (not in the paper) ---------------------------------------------


def word_spread(u: Tensor) -> Tensor:
    """1 / the effective number of directions a batch of pseudo-words (n, D) varies in: ‖G‖²_F / tr(G)²,
    G the Gram matrix of the words centred over the batch. 1 when every code's word moves along one
    line (or are all one word), 1/(n−1) when the n words spread evenly; scale-free, so it never asks for
    louder words."""
    r = u.float() - u.float().mean(dim=0)
    g = r @ r.T
    trace = g.diagonal().sum()
    # n identical words vary in no direction: 1, the term's maximum (never 0, which would reward collapse).
    return torch.where(trace > 0, g.pow(2).sum() / trace.clamp_min(1e-30).pow(2), torch.ones_like(trace))


# -- the whole objective -------------------------------------------------------------------------


@dataclass
class LossTerms:
    """L and its parts for one step; tensors are 0-d (only `total` needs to be backpropagated)."""

    total: Tensor  # L = λ_con·L_con + λ_back·L_back
    l_con: Tensor  # L_con = l_pos + λ_neg·l_neg
    l_pos: Tensor  # mean d_m(x̂*, x̂+): falls as a code keeps its person across captions and noise
    l_neg: Tensor  # mean 1/(d_m(x̂*, x̂-) + ε), unweighted (−mean d_m(x̂*, x̂-) with negative="subtract")
    d_neg: Tensor  # mean d_m(x̂*, x̂-): rises as different codes give different people
    l_back: Tensor  # L_back
    lambda_neg: float  # λ_neg at this step (γ in its unit)
    l_spread: Tensor  # word_spread of the step's words, averaged over the encoders (0 without words)


def cocoins_loss(x_anchor, x_pos, x_neg, x1, x2, m, step: int, total_steps: int, config: LossConfig = LossConfig(),
                 words: tuple[Tensor, ...] = (), gamma_scale: float = 1.0) -> LossTerms:
    """L (eq. 9) for one batch of x̂₀ estimates at training step `step` of `total_steps`; `words`, the
    step's pseudo-words standardised by each encoder's token statistics, for λ_spread·word_spread;
    `gamma_scale`, γ's unit (1, or D² under gamma_unit "d_neg": step.py's GammaScale)."""
    # λ_neg = γ·(k/K)^β, γ in its unit
    lam = lambda_neg(step, total_steps, config.gamma, config.beta) * gamma_scale
    if config.mask == "none":
        m = torch.ones_like(m)  # Table 4 "without mask": L_con compares whole images, and m̃ = 0
    elif config.mask != "subject":
        raise UserError(f"unknown mask {config.mask!r}; choose one of {', '.join(MASKS)}")
    l_pos, l_neg, d_neg = _contrastive_terms(x_anchor, x_pos, x_neg, m, config.distance, config.eps,
                                             config.negative, config.mask_reduction)
    # L_con = d_m(x̂*, x̂+) + λ_neg / d_m(x̂*, x̂-)     (or d_m(x̂*, x̂+) − λ_neg·d_m(x̂*, x̂-))
    l_con = l_pos + lam * l_neg
    # m̃ = 1 − m: the background is everything the subject mask does not cover.
    l_back = background_loss(x_anchor, x_pos, x_neg, x1, x2, 1.0 - m.float(), config.distance, config.mask_reduction)
    # L = λ_con·L_con + λ_back·L_back  (+ λ_spread·L_spread, off by default)
    total = config.lambda_con * l_con + config.lambda_back * l_back
    l_spread = sum(word_spread(u) for u in words) / len(words) if words else torch.zeros_like(l_pos)
    if config.lambda_spread:
        if not words:
            raise ValueError("lambda_spread needs the step's words")
        total = total + config.lambda_spread * l_spread
    return LossTerms(total=total, l_con=l_con, l_pos=l_pos, l_neg=l_neg, d_neg=d_neg, l_back=l_back, lambda_neg=lam,
                     l_spread=l_spread)
