"""Group advantages on hand-computed cases, and the clipped policy loss."""
import numpy as np
import pytest
import torch

from common.grpo import clipped_policy_loss, group_advantages


def test_group_std_advantages_by_hand():
    rewards = [1.0, 3.0, 0.0, 4.0]   # group 0: mean 2, std 1; group 1: mean 2, std 2
    out = group_advantages(rewards, [0, 0, 1, 1], global_std=False)
    np.testing.assert_allclose(out.advantages, [-1 / 1.0001, 1 / 1.0001, -2 / 2.0001, 2 / 2.0001])
    assert out.mean_group_std == pytest.approx(1.5)
    assert out.zero_std_fraction == 0.0


def test_global_std_advantages_by_hand():
    rewards = [1.0, 3.0, 0.0, 4.0]   # all rewards: mean 2, population std sqrt(2.5)
    out = group_advantages(rewards, [7, 7, 9, 9], global_std=True)
    s = np.sqrt(2.5) + 1e-4
    np.testing.assert_allclose(out.advantages, [-1 / s, 1 / s, -2 / s, 2 / s])


def test_advantages_are_clipped():
    rewards = [0.0] * 99 + [1.0, 0.0, 0.0]
    groups = [0] * 100 + [1, 1]
    out = group_advantages(rewards, groups, global_std=True, clip=5.0)
    assert out.advantages.max() == 5.0
    out = group_advantages(rewards, groups, global_std=True, clip=2.0)
    assert out.advantages.max() == 2.0


def test_zero_std_group_gets_exactly_zero():
    rewards = [0.1, 0.1, 0.1, 0.2, 0.5]
    out = group_advantages(rewards, [0, 0, 0, 1, 1], global_std=False)
    assert np.all(out.advantages[:3] == 0.0)
    assert out.zero_std_fraction == 0.5
    assert list(out.zero_std_groups) == [0]


def test_nan_reward_is_refused():
    with pytest.raises(ValueError, match="NaN"):
        group_advantages([0.1, float("nan")], [0, 0])


def test_clipped_loss_by_hand():
    old = torch.zeros(3)
    new = torch.log(torch.tensor([1.5, 1.0, 0.5]))
    adv = torch.tensor([1.0, -1.0, -2.0])
    out = clipped_policy_loss(new, old, adv, clip_range=0.2)
    # per sample: max(-A r, -A clip(r)): A=1,r=1.5 -> max(-1.5,-1.2)=-1.2; A=-1,r=1 -> 1; A=-2,r=.5 -> max(1, 1.6)=1.6
    assert out.loss.item() == pytest.approx((-1.2 + 1.0 + 1.6) / 3, rel=1e-6)
    assert out.clip_fraction.item() == pytest.approx(2 / 3)
    assert out.approx_kl.item() == pytest.approx(0.5 * (np.log(1.5) ** 2 + np.log(0.5) ** 2) / 3, rel=1e-5)


def test_clipped_loss_gradient_vanishes_outside_the_trust_region():
    new = torch.log(torch.tensor([2.0])).requires_grad_()
    clipped_policy_loss(new, torch.zeros(1), torch.tensor([1.0]), clip_range=1e-4).loss.backward()
    assert new.grad.item() == 0.0
