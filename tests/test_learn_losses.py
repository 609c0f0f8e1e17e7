import math

import pytest
import torch

from mrflesion.learn.losses import log_cosh, make_loss, soft_dice


def _pt():
    pred = torch.tensor([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 2, 2)
    target = torch.tensor([0.0, 0.0, 0.0, 1.0]).reshape(1, 1, 2, 2)
    return pred, target  # errors 0, 1, 2, 2


def test_mse_mae_lcl_hand_values():
    pred, target = _pt()
    assert make_loss("mse")(pred, target).item() == pytest.approx((0 + 1 + 4 + 4) / 4)
    assert make_loss("mae")(pred, target).item() == pytest.approx((0 + 1 + 2 + 2) / 4)
    expected = (0 + math.log(math.cosh(1)) + 2 * math.log(math.cosh(2))) / 4  # 0.7709466
    assert make_loss("lcl")(pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_loss_is_mean_over_channels_and_per_channel_values():
    pred = torch.zeros(2, 2, 1, 2)
    target = torch.zeros(2, 2, 1, 2)
    target[:, 0] = 1.0  # channel 0 error 1, channel 1 error 0
    loss = make_loss("mse")
    assert loss.per_channel(pred, target).tolist() == [1.0, 0.0]
    assert loss(pred, target).item() == pytest.approx(0.5)


def test_stats_accumulate_exactly():
    torch.manual_seed(0)
    p, t = torch.rand(6, 2, 4, 4), torch.rand(6, 2, 4, 4)
    for name in ("mse", "mae", "lcl", "dice"):
        loss = make_loss(name)
        whole = loss.per_channel(p, t)
        parts = loss.from_stats(loss.stats(p[:2], t[:2]) + loss.stats(p[2:], t[2:]))
        assert torch.allclose(whole, parts, atol=1e-6)


def test_soft_dice_hand_value_identical_and_disjoint():
    p = torch.tensor([1.0, 0.5, 0.0, 0.0]).reshape(1, 1, 2, 2)
    t = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2)
    # sum(pt) = 1.5, sum(p) = 1.5, sum(t) = 2, smoothing 1
    assert soft_dice(p, t).item() == pytest.approx(1 - 4 / 4.5, rel=1e-5)
    assert soft_dice(p, t, smooth=0.0).item() == pytest.approx(1 - 3 / 3.5, rel=1e-5)
    m = (torch.rand(1, 1, 8, 8) > 0.5).float()
    assert soft_dice(m, m).item() == pytest.approx(0.0, abs=1e-5)
    assert soft_dice(m, 1 - m).item() == pytest.approx(1 - 1 / 65, abs=1e-6)  # sum(p) + sum(t) = 64
    assert make_loss("dice")(m, m).item() == pytest.approx(0.0, abs=1e-5)


def test_soft_dice_pushes_the_background_down_without_lesion():
    """Why DICE-1 collapsed to all-ones: unsmoothed, a batch without lesion voxels has a constant loss and
    no gradient; with the smoothing its gradient lowers every prediction (and is zero only at p = 0)."""
    p = torch.full((2, 1, 4, 4), 0.7, requires_grad=True)
    t = torch.zeros(2, 1, 4, 4)
    soft_dice(p, t, smooth=0.0).backward()
    assert torch.count_nonzero(p.grad) == 0
    p.grad = None
    soft_dice(p, t).backward()
    assert (p.grad > 0).all()  # gradient descent lowers p


def test_log_cosh_large_errors_finite_value_and_gradient():
    e = torch.tensor([1e4, -1e4, 30.0, 0.0], requires_grad=True)
    v = log_cosh(e)
    assert torch.isfinite(v).all()
    assert not torch.isfinite(torch.log(torch.cosh(e.detach()[:1]))).all()  # the naive form overflows
    assert v[0].item() == pytest.approx(1e4 - math.log(2), rel=1e-7)
    assert v[2].item() == pytest.approx(30.0 - math.log(2), abs=1e-5)  # asymptote |e| - log 2
    assert v[3].item() == pytest.approx(0.0, abs=1e-7)
    v.sum().backward()
    assert torch.isfinite(e.grad).all()
    assert e.grad.tolist() == pytest.approx([1.0, -1.0, 1.0, 0.0], abs=1e-6)  # d/de log cosh = tanh
    pred = torch.tensor([[[[1e4]]]], requires_grad=True)
    loss = make_loss("lcl")(pred, torch.zeros(1, 1, 1, 1))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()


def test_unknown_loss():
    with pytest.raises(ValueError):
        make_loss("huber")
