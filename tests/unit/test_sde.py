"""The SDE step against an independent Gaussian density, its ODE limit, precision and indexing."""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from common.sde import kl_to_reference, sde_step_with_logprob


@pytest.fixture(scope="module")
def sigmas():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    return scheduler.sigmas.float()


def _std_t(sigmas, i, a):
    sigma = sigmas[i].item()
    guarded = sigmas[1].item() if sigma == 1 else sigma
    return a * math.sqrt(sigma / (1 - guarded))


@pytest.mark.parametrize("i", [0, 1, 5, 9])
def test_log_prob_matches_normal_density(sigmas, i):
    g = torch.Generator().manual_seed(i)
    x, v = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    out = sde_step_with_logprob(v, x, sigmas, i, noise_level=0.7, generator=g)

    sigma, dt = sigmas[i].item(), (sigmas[i + 1] - sigmas[i]).item()
    std = _std_t(sigmas, i, 0.7)
    mean = x * (1 + std**2 / (2 * sigma) * dt) + v * (1 + std**2 * (1 - sigma) / (2 * sigma)) * dt
    normal = torch.distributions.Normal(mean, std * math.sqrt(-dt))
    expected = normal.log_prob(out.prev_sample).mean(dim=(1, 2, 3))

    torch.testing.assert_close(out.prev_sample_mean, mean)
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    assert out.log_prob.shape == (3,)
    assert out.std_dev.flatten()[0].item() == pytest.approx(std, rel=1e-6)


def test_given_prev_sample_is_scored_not_resampled(sigmas):
    x, v, target = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = sde_step_with_logprob(v, x, sigmas, 3, prev_sample=target)
    assert torch.equal(out.prev_sample, target)
    far = sde_step_with_logprob(v, x, sigmas, 3, prev_sample=out.prev_sample_mean + 10)
    near = sde_step_with_logprob(v, x, sigmas, 3, prev_sample=out.prev_sample_mean)
    assert (near.log_prob > far.log_prob).all()


def test_sampled_noise_has_the_step_std(sigmas):
    x, v = torch.zeros(1, 4, 64, 64), torch.zeros(1, 4, 64, 64)
    out = sde_step_with_logprob(v, x, sigmas, 2, generator=torch.Generator().manual_seed(0))
    dt = (sigmas[3] - sigmas[2]).item()
    assert (out.prev_sample - out.prev_sample_mean).std().item() == pytest.approx(
        _std_t(sigmas, 2, 0.7) * math.sqrt(-dt), rel=0.03)


@pytest.mark.parametrize("i", [0, 4, 9])
def test_noise_level_zero_is_the_euler_ode_step(sigmas, i):
    x, v = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    out = sde_step_with_logprob(v, x, sigmas, i, noise_level=0.0)
    torch.testing.assert_close(out.prev_sample, x + v * (sigmas[i + 1] - sigmas[i]))


def test_bf16_inputs_are_computed_in_float32(sigmas):
    x, v = torch.randn(2, 4, 3, 3).bfloat16(), torch.randn(2, 4, 3, 3).bfloat16()
    target = torch.randn(2, 4, 3, 3)
    low = sde_step_with_logprob(v, x, sigmas, 4, prev_sample=target)
    high = sde_step_with_logprob(v.float(), x.float(), sigmas, 4, prev_sample=target)
    assert low.prev_sample_mean.dtype == low.log_prob.dtype == torch.float32
    assert torch.equal(low.log_prob, high.log_prob)


def test_per_sample_step_indices_equal_separate_steps(sigmas):
    x, v, target = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3)
    index = torch.tensor([0, 4, 8])
    joint = sde_step_with_logprob(v, x, sigmas, index, prev_sample=target)
    for b, i in enumerate(index.tolist()):
        alone = sde_step_with_logprob(v[b:b + 1], x[b:b + 1], sigmas, i, prev_sample=target[b:b + 1])
        torch.testing.assert_close(joint.log_prob[b:b + 1], alone.log_prob)
        torch.testing.assert_close(joint.prev_sample_mean[b:b + 1], alone.prev_sample_mean)


def test_kl_to_reference(sigmas):
    mean, ref = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    std = torch.full((1, 1, 1, 1), 0.3)
    expected = (((mean - ref) ** 2).mean(dim=(1, 2, 3)) / (2 * 0.09)).mean()
    torch.testing.assert_close(kl_to_reference(mean, ref, std), expected)
    assert kl_to_reference(mean, mean, std).item() == 0.0
