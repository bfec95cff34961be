"""The weight average: the same arithmetic as torch's AveragedModel with the warmed-up decay, kept across
a checkpoint, and refusing a model it does not average."""
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from bench.ema_speed import warmed_up_ema  # AveragedModel's update as the trainer had it, the bench's baseline
from pipeline.ema import WeightAverage


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))


def train_a_little(net: nn.Module, steps: int, averages: list) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for step in range(steps):
        x = torch.randn(4, 3, 10, 10, generator=torch.Generator().manual_seed(step))
        net(x).square().mean().backward()  # train mode: BatchNorm's statistics and counters move too
        opt.step()
        opt.zero_grad()
        for update in averages:
            update(net)


def test_matches_averaged_model_weights_and_batchnorm_statistics():
    net = small_net()
    ours = WeightAverage(net, decay=0.9)
    theirs = AveragedModel(net, multi_avg_fn=warmed_up_ema(0.9), use_buffers=True)
    train_a_little(net, 30, [ours.update, theirs.update_parameters])  # n from 0 past the warm-up's (1+n)/(10+n) = 0.9

    state = ours.state_dict()
    expected = {k.removeprefix("module."): v for k, v in theirs.state_dict().items()}
    assert state.keys() == expected.keys() and int(state["n_averaged"]) == 30
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7, msg=key)
    # an average, not the last weights, and BatchNorm's counters copied
    assert not torch.allclose(state["0.weight"], net[0].weight)
    assert int(state["1.num_batches_tracked"]) == int(net[1].num_batches_tracked) == 30


def test_resumes_from_its_state_dict_exactly():
    net, other = small_net(), small_net()
    ours = WeightAverage(net, decay=0.95)
    train_a_little(net, 5, [ours.update])
    saved = {k: v.clone() for k, v in ours.state_dict().items()}

    resumed = WeightAverage(other, decay=0.95)  # a fresh process: another copy of the network
    other.load_state_dict(net.state_dict())
    resumed.load_state_dict(saved)
    assert resumed.n_averaged == 5
    train_a_little(net, 3, [ours.update])
    train_a_little(other, 3, [resumed.update])
    for key, value in ours.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_refuses_another_model():
    ours = WeightAverage(small_net(), decay=0.9)
    with pytest.raises(ValueError, match="another model"):
        ours.update(small_net())
