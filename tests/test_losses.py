"""losses.py: every term of the CoCoIns objective against numbers worked out by hand."""

import math

import pytest
import torch

from losses import LossConfig, background_loss, cocoins_loss, distance, lambda_neg, masked_distance, word_spread
from model.errors import UserError


def img(*pixels):
    """A (1, 1, 1, n) latent from a list of pixel values."""
    return torch.tensor(pixels, dtype=torch.float32).reshape(1, 1, 1, -1)


def test_l2_is_the_mean_squared_error_and_l1_the_mean_absolute_error_per_sample():
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 2, 2)
    y = torch.tensor([[0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, -1.0]]).reshape(2, 1, 2, 2)
    # sample 0: (1 + 4 + 9 + 16)/4 = 7.5 and (1+2+3+4)/4 = 2.5; sample 1: (4 + 0 + 0 + 4)/4 = 2 and (2+0+0+2)/4 = 1
    assert distance(x, y, "l2").tolist() == [7.5, 2.0]
    assert distance(x, y, "l1").tolist() == [2.5, 1.0]


def test_masked_distance_masks_both_inputs_and_averages_over_every_element():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])[None]  # (1, C=2, 2, 2)
    y = torch.zeros(1, 2, 2, 2)
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]  # (1, 1, 2, 2), broadcast over channels
    # kept pixels: 1, 4 (channel 0) and 5, 8 (channel 1); the mean runs over all 8 elements
    assert masked_distance(x, y, m, "l2").item() == pytest.approx((1 + 16 + 25 + 64) / 8)
    assert masked_distance(x, y, m, "l1").item() == pytest.approx((1 + 4 + 5 + 8) / 8)


def test_distances_are_float32_even_for_bfloat16_latents():
    x = torch.ones(2, 4, 3, 3, dtype=torch.bfloat16)
    assert distance(x, 0 * x).dtype == torch.float32
    assert masked_distance(x, 0 * x, torch.ones(2, 1, 3, 3, dtype=torch.bfloat16)).dtype == torch.float32


def test_unknown_distance_name_is_a_user_error():
    with pytest.raises(UserError, match="l2"):
        distance(img(1.0), img(0.0), "cosine")


def test_lambda_neg_schedule_at_start_middle_and_end():
    # γ·(k/K)^β with γ = 2, β = 3, K = 10
    assert lambda_neg(0, 10, gamma=2.0, beta=3.0) == 0.0
    assert lambda_neg(5, 10, gamma=2.0, beta=3.0) == pytest.approx(2.0 * 0.5**3)
    assert lambda_neg(10, 10, gamma=2.0, beta=3.0) == pytest.approx(2.0)
    # linear ramp at β = 1, and a run continued past K stays at γ instead of overshooting
    assert lambda_neg(3, 12, gamma=1.0, beta=1.0) == pytest.approx(0.25)
    assert lambda_neg(20, 10, gamma=2.0, beta=3.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="K"):
        lambda_neg(0, 0, gamma=1.0, beta=1.0)


def contrastive_loss(x_anchor, x_pos, x_neg, m, lambda_neg, dist="l2", eps=1e-4):
    """L_con as cocoins_loss computes it, at the last step (k = K), where λ_neg = γ."""
    config = LossConfig(distance=dist, gamma=lambda_neg, beta=1.0, eps=eps)
    return cocoins_loss(x_anchor, x_pos, x_neg, x_anchor, x_pos, m, 1, 1, config).l_con


def test_contrastive_loss_adds_the_reciprocal_of_the_negative_distance_not_its_negation():
    x_anchor, x_pos, x_neg = img(0.0, 0.0), img(1.0, 1.0), img(2.0, 2.0)
    m = torch.ones(1, 1, 1, 2)
    # d(x*, x+) = 1, d(x*, x-) = 4:  L_con = 1 + 0.5 / (4 + ε)
    eps = 1e-4
    loss = contrastive_loss(x_anchor, x_pos, x_neg, m, lambda_neg=0.5, dist="l2", eps=eps)
    assert loss.item() == pytest.approx(1 + 0.5 / (4 + eps))
    # a subtracted triplet would give 1 − 0.5·4 = −1; a farther negative must lower the loss towards d_pos
    farther = contrastive_loss(x_anchor, x_pos, img(4.0, 4.0), m, lambda_neg=0.5, dist="l2", eps=eps)
    assert 1.0 < farther.item() < loss.item()
    assert farther.item() == pytest.approx(1 + 0.5 / (16 + eps))


def test_reciprocal_is_taken_per_sample_before_the_batch_mean():
    x_anchor = torch.zeros(2, 1, 1, 1)
    x_neg = torch.tensor([1.0, 2.0]).reshape(2, 1, 1, 1)  # d_neg = 1 and 4
    m = torch.ones(2, 1, 1, 1)
    loss = contrastive_loss(x_anchor, x_anchor, x_neg, m, lambda_neg=1.0, eps=0.0)
    # mean(1/1, 1/4) = 0.625, not 1/mean(1, 4) = 0.4
    assert loss.item() == pytest.approx(0.625)


@pytest.mark.parametrize("dist", ["l2", "l1"])
def test_identical_anchor_and_negative_give_a_finite_loss_and_finite_gradients(dist):
    x_anchor = torch.randn(2, 4, 3, 3, requires_grad=True)
    x_neg = x_anchor.detach().clone().requires_grad_(True)
    x_pos = torch.randn(2, 4, 3, 3, requires_grad=True)
    m = torch.ones(2, 1, 3, 3)
    eps = 1e-4
    loss = contrastive_loss(x_anchor, x_pos, x_neg, m, lambda_neg=0.3, dist=dist, eps=eps)
    d_pos = distance(x_anchor, x_pos, dist).mean().item()
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(d_pos + 0.3 / eps, rel=1e-5)
    loss.backward()
    for t in (x_anchor, x_pos, x_neg):
        assert torch.isfinite(t.grad).all()


def test_contrastive_loss_ignores_pixels_outside_the_subject_mask():
    x_anchor, x_pos, x_neg = (torch.randn(2, 4, 4, 4) for _ in range(3))
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, 1:3, 1:3] = 1
    before = contrastive_loss(x_anchor, x_pos, x_neg, m, lambda_neg=0.7)
    outside = (1 - m).bool().expand_as(x_anchor)
    changed = [x_anchor.masked_fill(outside, 100.0), x_pos.masked_fill(outside, 3.0), x_neg.masked_fill(outside, -50.0)]
    assert torch.equal(contrastive_loss(*changed, m, lambda_neg=0.7), before)
    # and the subject itself does count
    inside = m.bool().expand_as(x_anchor)
    assert contrastive_loss(x_anchor.masked_fill(inside, 9.0), x_pos, x_neg, m, lambda_neg=0.7) != before


def test_background_loss_sums_the_three_pairs_with_their_plain_prompt_predictions():
    # one subject pixel, one background pixel; m̃ = [0, 1]
    m_bg = torch.tensor([0.0, 1.0]).reshape(1, 1, 1, 2)
    x_anchor, x_pos, x_neg = img(0.0, 0.0), img(1.0, 3.0), img(2.0, 5.0)
    x1, x2 = img(7.0, 1.0), img(9.0, 2.0)
    # d(x*, x̂1) = (0 − 1)²/2 = 0.5;  d(x+, x̂2) = (3 − 2)²/2 = 0.5;  d(x-, x̂1) = (5 − 1)²/2 = 8
    assert background_loss(x_anchor, x_pos, x_neg, x1, x2, m_bg, "l2").item() == pytest.approx(9.0)
    # l1: 1/2 + 1/2 + 4/2 = 3
    assert background_loss(x_anchor, x_pos, x_neg, x1, x2, m_bg, "l1").item() == pytest.approx(3.0)


def test_background_loss_pairs_the_positive_with_x2_and_the_negative_with_x1():
    m_bg = torch.ones(1, 1, 1, 1)
    z, one = img(0.0), img(1.0)
    # only x+ differs from its partner x̂2 -> 1; swapping the partners would give 0 + 1 + 1
    assert background_loss(z, one, z, z, one, m_bg).item() == pytest.approx(0.0)
    assert background_loss(z, one, z, one, z, m_bg).item() == pytest.approx(1.0 + 1.0 + 1.0)


def test_background_loss_ignores_the_subject_and_cocoins_loss_uses_one_minus_the_mask():
    xs = [torch.randn(2, 4, 4, 4) for _ in range(5)]
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, :2] = 1
    before = cocoins_loss(*xs, m, step=3, total_steps=10).l_back
    inside = m.bool().expand_as(xs[0])
    changed = [x.masked_fill(inside, float(k)) for k, x in enumerate(xs)]
    assert torch.equal(cocoins_loss(*changed, m, step=3, total_steps=10).l_back, before)
    assert before.item() == pytest.approx(background_loss(*xs, 1 - m).item())


def test_cocoins_loss_combines_the_terms_with_their_weights():
    m = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)  # pixel 0 is the subject
    x_anchor, x_pos, x_neg = img(0.0, 0.0), img(1.0, 3.0), img(2.0, 5.0)
    x1, x2 = img(7.0, 1.0), img(9.0, 2.0)
    config = LossConfig(distance="l2", gamma=0.8, beta=1.0, lambda_con=2.0, lambda_back=0.5, eps=0.0)
    terms = cocoins_loss(x_anchor, x_pos, x_neg, x1, x2, m, step=5, total_steps=10, config=config)
    # λ_neg = 0.8·(5/10) = 0.4;  d_m(x*, x+) = 1/2;  d_m(x*, x-) = 4/2 = 2
    assert terms.lambda_neg == pytest.approx(0.4)
    assert terms.l_pos.item() == pytest.approx(0.5)
    assert terms.d_neg.item() == pytest.approx(2.0)
    assert terms.l_neg.item() == pytest.approx(0.5)
    assert terms.l_con.item() == pytest.approx(0.5 + 0.4 * 0.5)
    # background pixel only: (0−1)²/2 + (3−2)²/2 + (5−1)²/2 = 9
    assert terms.l_back.item() == pytest.approx(9.0)
    assert terms.total.item() == pytest.approx(2.0 * 0.7 + 0.5 * 9.0)


def test_cocoins_loss_has_no_negative_push_at_step_zero_and_gradients_reach_every_prediction():
    xs = [torch.randn(2, 4, 4, 4, requires_grad=True) for _ in range(3)]
    x1, x2 = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    m = (torch.rand(2, 1, 4, 4) > 0.5).float()
    terms = cocoins_loss(*xs, x1, x2, m, step=0, total_steps=100)
    assert terms.lambda_neg == 0.0
    assert terms.l_con.item() == pytest.approx(terms.l_pos.item())
    terms.total.backward()
    for x in xs:
        assert x.grad is not None and x.grad.abs().sum() > 0



# -- the ablations and open choices (train.py --negative, --mask, --mask-reduction) --------------


def test_subtracted_negative_term_lowers_the_loss_by_lambda_times_the_negative_distance():
    """Table 3, "Pos+Neg as a subtraction": L_con = d_m(x̂*, x̂+) − λ_neg·d_m(x̂*, x̂-)."""
    m = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    x_anchor, x_pos, x_neg = img(0.0, 0.0), img(1.0, 3.0), img(2.0, 5.0)
    x1, x2 = img(7.0, 1.0), img(9.0, 2.0)
    config = LossConfig(gamma=0.8, negative="subtract")
    terms = cocoins_loss(x_anchor, x_pos, x_neg, x1, x2, m, step=5, total_steps=10, config=config)
    # λ_neg = 0.4;  d_m(x*, x+) = 1/2;  d_m(x*, x-) = 4/2 = 2:  L_con = 0.5 − 0.4·2 (reciprocal: 0.5 + 0.4/2)
    assert terms.l_neg.item() == pytest.approx(-2.0)
    assert terms.l_con.item() == pytest.approx(0.5 - 0.4 * 2.0)
    assert terms.total.item() == pytest.approx(0.5 - 0.8 + 9.0)
    reciprocal = cocoins_loss(x_anchor, x_pos, x_neg, x1, x2, m, step=5, total_steps=10, config=LossConfig(gamma=0.8))
    assert reciprocal.l_con.item() == pytest.approx(0.5 + 0.4 / (2.0 + 1e-4))


def test_without_mask_the_contrastive_loss_sees_the_whole_image_and_the_background_loss_is_zero():
    """Table 4, "without mask": m = 1 everywhere, so m̃ = 0."""
    m = torch.tensor([1.0, 0.0]).reshape(1, 1, 1, 2)
    x_anchor, x_pos, x_neg = img(0.0, 0.0), img(1.0, 3.0), img(2.0, 5.0)
    x1, x2 = img(7.0, 1.0), img(9.0, 2.0)
    terms = cocoins_loss(x_anchor, x_pos, x_neg, x1, x2, m, step=10, total_steps=10,
                         config=LossConfig(gamma=1.0, eps=0.0, mask="none"))
    # d(x*, x+) = (1 + 9)/2 = 5 and d(x*, x-) = (4 + 25)/2 = 14.5 over both pixels (with the mask: 0.5 and 2)
    assert terms.l_pos.item() == pytest.approx(5.0)
    assert terms.d_neg.item() == pytest.approx(14.5)
    assert terms.l_back.item() == 0.0
    assert terms.total.item() == pytest.approx(5.0 + 1 / 14.5)


def test_area_reduction_divides_the_masked_sum_by_the_mask_area_and_gives_zero_for_an_empty_mask():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])[None]  # (1, C=2, 2, 2)
    y = torch.zeros(1, 2, 2, 2)
    m = torch.tensor([[1.0, 0.0], [0.0, 0.5]])[None, None]  # area C·Σm = 2·1.5 = 3
    # kept: 1, 0.5·4 = 2 (channel 0) and 5, 0.5·8 = 4 (channel 1): sum of squares 1 + 4 + 25 + 16 = 46
    assert masked_distance(x, y, m, "l2", "area").item() == pytest.approx(46 / 3)
    assert masked_distance(x, y, m, "l2", "all").item() == pytest.approx(46 / 8)
    assert masked_distance(x, y, m, "l1", "area").item() == pytest.approx((1 + 2 + 5 + 4) / 3)
    assert masked_distance(x, y, torch.zeros(1, 1, 2, 2), "l2", "area").item() == 0.0
    # the whole image as mask: area = every element, the same as "all"
    assert masked_distance(x, y, torch.ones(1, 1, 2, 2), "l2", "area").item() == pytest.approx(204 / 8)


def test_area_reduction_reaches_both_losses():
    xs = [torch.randn(2, 4, 4, 4) for _ in range(5)]
    m = torch.zeros(2, 1, 4, 4)
    m[:, :, :1] = 1  # a quarter of the image: "area" distances are 4x the subject's, 4/3x the background's
    plain = cocoins_loss(*xs, m, step=3, total_steps=10, config=LossConfig(eps=0.0))
    area = cocoins_loss(*xs, m, step=3, total_steps=10, config=LossConfig(eps=0.0, mask_reduction="area"))
    assert area.l_pos.item() == pytest.approx(4 * plain.l_pos.item(), rel=1e-5)
    assert area.d_neg.item() == pytest.approx(4 * plain.d_neg.item(), rel=1e-5)
    assert area.l_back.item() == pytest.approx(4 / 3 * plain.l_back.item(), rel=1e-5)


@pytest.mark.parametrize("field, value", [("negative", "negate"), ("mask", "box"), ("mask_reduction", "max")])
def test_unknown_loss_choices_are_user_errors(field, value):
    xs = [torch.randn(1, 4, 2, 2) for _ in range(5)]
    with pytest.raises(UserError, match=value):
        cocoins_loss(*xs, torch.ones(1, 1, 2, 2), 1, 2, LossConfig(**{field: value}))


def test_word_spread_is_one_over_the_number_of_directions_the_words_vary_in():
    # n words at the corners of a simplex (orthonormal, then centred) vary evenly in n − 1 directions.
    assert word_spread(torch.eye(5, 8)).item() == pytest.approx(1 / 4)
    # Scale-free: louder words spread no further.
    assert word_spread(100 * torch.eye(5, 8) + 3).item() == pytest.approx(1 / 4)
    # Words on one line, at any distances along it: one direction.
    line = torch.tensor([[0.0], [1.0], [5.0], [-2.0]]) * torch.randn(1, 8)
    assert word_spread(line).item() == pytest.approx(1.0)
    # Two orthogonal directions with equal spread: 1/2 (words ±a, ±b).
    a, b = torch.eye(8)[0], torch.eye(8)[1]
    assert word_spread(torch.stack([a, -a, b, -b])).item() == pytest.approx(0.5)
    # Every code the same word is the worst case, not a free zero.
    assert word_spread(torch.ones(4, 8)).item() == 1.0


def test_lambda_spread_adds_its_weighted_term_and_needs_the_words():
    m = torch.ones(1, 1, 1, 2)
    x = [img(0.0, 0.0), img(1.0, 3.0), img(2.0, 5.0), img(7.0, 1.0), img(9.0, 2.0)]
    words = (torch.eye(5, 8), torch.stack([torch.eye(8)[0], -torch.eye(8)[0], torch.eye(8)[1], -torch.eye(8)[1], torch.zeros(8)]))
    off = cocoins_loss(*x, m, step=5, total_steps=10, config=LossConfig(), words=words)
    on = cocoins_loss(*x, m, step=5, total_steps=10, config=LossConfig(lambda_spread=3.0), words=words)
    # the two encoders' spreads, 1/4 and (±a, ±b, 0: two directions, equal spread) 1/2, averaged
    assert on.l_spread.item() == pytest.approx((1 / 4 + 1 / 2) / 2) == off.l_spread.item()
    assert on.total.item() == pytest.approx(off.total.item() + 3.0 * 0.375)
    with pytest.raises(ValueError):
        cocoins_loss(*x, m, step=5, total_steps=10, config=LossConfig(lambda_spread=1.0))


def test_gamma_scale_is_the_unit_of_gamma_in_lambda_neg():
    # gamma_unit "d_neg" (step.py's GammaScale gives D²): λ_neg = γ·D²·(k/K)^β, the same loss as γ·D² absolute
    torch.manual_seed(0)
    x = [torch.randn(2, 4, 8, 8) for _ in range(5)]
    m = torch.ones(2, 1, 8, 8)
    scaled = cocoins_loss(*x, m, 3, 4, LossConfig(gamma=0.5), gamma_scale=0.01)
    direct = cocoins_loss(*x, m, 3, 4, LossConfig(gamma=0.5 * 0.01))
    assert scaled.lambda_neg == pytest.approx(0.5 * 0.01 * 3 / 4) and torch.equal(scaled.total, direct.total)


def test_gamma_scale_measures_the_first_steps_then_holds():
    from step import GAMMA_WARMUP, GammaScale

    absolute = GammaScale("absolute")
    absolute.observe(0.3)
    assert absolute.value() == 1.0 and absolute.seen == []
    unit = GammaScale("d_neg")
    for k in range(GAMMA_WARMUP):
        assert unit.value() == 0.0  # no negative term while D is measured
        unit.observe(0.01 * (k + 1))
    mean = 0.01 * (GAMMA_WARMUP + 1) / 2
    assert unit.value() == pytest.approx(mean**2)
    unit.observe(5.0)  # later distances change nothing
    assert unit.value() == pytest.approx(mean**2)
    assert GammaScale("d_neg", unit.seen).value() == unit.value()  # what state.pt keeps is enough to resume
