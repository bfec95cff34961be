"""PoseNet: shapes per scale, gradient paths, the scale-change fusion, bf16 (ONNX: tests/test_export.py).
Small widths and inputs so the file runs in seconds on 2 cores."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ModelConfig, load_config
from pipeline.model import (PoseNet, build_model, count_flops, count_parameters, describe,
                            hourglass_depth)

pytestmark = pytest.mark.quick  # seconds each: `pytest -m quick` runs them

J = 14
MSC_HG = [[2, 2], [4, 4], [8, 2]]
STACKED = [[4, 8]]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny convs: extra threads only add sync overhead, and oversubscribe a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_model(stages=MSC_HG, channels=16, input_size=64, seed=0):
    torch.manual_seed(seed)
    return PoseNet(J, stages, channels, hg_min_size=4, input_size=input_size)


def test_msc_hg_shapes_per_scale():
    model = small_model(input_size=64)
    out = model(torch.randn(2, 3, 64, 64))
    assert model.strides == [2, 2, 4, 4, 4, 4, 8, 8]
    assert [tuple(o.shape) for o in out] == [(2, J, 32, 32)] * 2 + [(2, J, 16, 16)] * 4 + [(2, J, 8, 8)] * 2


def test_stacked_baseline_shapes():
    model = small_model(STACKED, input_size=64)
    out = model(torch.randn(2, 3, 64, 64))
    assert model.strides == [4] * 8
    assert [tuple(o.shape) for o in out] == [(2, J, 16, 16)] * 8
    assert "2" not in model.stem.branch and "8" not in model.stem.branch  # no unused stem branches


def test_hourglass_depth_reaches_min_size():
    # 256 input, hg_min_size 4: depth 5 at 128, 4 at 64, 3 at 32
    assert [hourglass_depth(s, 4) for s in (128, 64, 32)] == [5, 4, 3]
    assert hourglass_depth(48, 4) == 3  # 48 -> 24 -> 12 -> 6; 3 would be odd and < 4
    model = PoseNet(J, MSC_HG, 8, hg_min_size=4, input_size=128)
    depths = []
    for module in model.hg_modules:
        hg, d = module.hourglass, 1
        while hasattr(hg.inner, "inner"):
            hg, d = hg.inner, d + 1
        depths.append(d)
    assert depths == [4, 4, 3, 3, 3, 3, 2, 2]


def test_gradient_reaches_stem_through_every_module():
    # Backprop each module's loss alone: it must reach the stem's first conv and every earlier
    # module, and no later module (outputs are causal along the cascade).
    model = small_model(input_size=64, channels=8)
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    targets = [torch.rand_like(o) for o in out]
    first_conv = model.stem.conv[0].weight
    for i in range(len(out)):
        model.zero_grad(set_to_none=True)
        F.mse_loss(out[i], targets[i]).backward(retain_graph=True)
        assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0, f"module {i}: no grad at stem"
        for j, module in enumerate(model.hg_modules):
            grad = module.hourglass.skip.conv1.weight.grad
            reached = grad is not None and grad.abs().sum() > 0
            assert reached == (j <= i), f"loss of module {i}: grad reached module {j} = {reached}"


def test_every_parameter_gets_a_gradient():
    # DDP / DeepSpeed fail on parameters the loss never uses
    for stages in (MSC_HG, STACKED, [[2, 1], [8, 1]]):
        model = small_model(stages, input_size=64, channels=8)
        out = model(torch.randn(2, 3, 64, 64))
        sum(F.mse_loss(o, torch.rand_like(o)) for o in out).backward()
        unused = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not unused, f"{stages}: unused parameters {unused[:5]}"


def test_scale_change_fuses_previous_heatmaps():
    # Module 2 (index 1) is the last at stride 2; its heatmap head feeds module 3 only through
    # the pooled-heatmap merge. Changing that head must change module 3's output.
    model = small_model(input_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.hg_modules[1].heatmaps.weight.mul_(3.0).add_(0.1)
        after = model(x)
    assert torch.equal(before[0], after[0])  # earlier modules untouched
    assert not torch.allclose(before[1], after[1])
    assert not torch.allclose(before[2], after[2]), "module 3 ignores module 2's heatmaps"


def test_scale_change_uses_new_stem_map():
    model = small_model(input_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        model.stem.branch["8"][1].conv3.weight.mul_(3.0).add_(0.1)  # only feeds the /8 fusion
        after = model(x)
    assert all(torch.equal(b, a) for b, a in zip(before[:6], after[:6]))
    assert not torch.allclose(before[6], after[6])


def test_bf16_autocast_and_bf16_weights():
    model = small_model(input_size=64, channels=8)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out[0].dtype == torch.bfloat16 and all(torch.isfinite(o.float()).all() for o in out)
    model = model.to(torch.bfloat16)  # DeepSpeed bf16 casts the weights
    out = model(x.to(torch.bfloat16))
    assert [o.dtype for o in out] == [torch.bfloat16] * 8
    sum(o.float().square().mean() for o in out).backward()
    assert torch.isfinite(model.stem.conv[0].weight.grad.float()).all()


def test_counts_and_describe():
    cfg = load_config(None, ["data.input_size=64", "model.channels=8"])
    model = build_model(cfg.model, J, 64)
    params = count_parameters(model)
    assert params == sum(p.numel() for p in model.parameters()) > 0
    flops = count_flops(model, 64)
    # FLOPs scale with the image area (all convs): doubling the side is ~4x
    assert 3.5 < count_flops(build_model(cfg.model, J, 128), 128) / flops < 4.5
    # at least the first conv: 2 * (3*7*7) MACs per output pixel per channel
    assert flops > 2 * 3 * 49 * (8 // 4) * 32 * 32
    text = describe(cfg, num_joints=J)
    assert cfg.name in text and "2@/2 + 4@/4 + 2@/8" in text and f"{params / 1e6:.2f}" in text


def test_build_model_rejects_too_small_input():
    with pytest.raises(ValueError, match="input_size=32 at stride 8 leaves no room for an hourglass down to "
                                         "hg_min_size=4"):
        build_model(ModelConfig(stages=[[8, 1]], hg_min_size=4), J, input_size=32)  # 4 px at /8: no room


def test_stage_channels_set_each_scales_width_and_are_checked():
    """model.stage_channels (the CPU recipe: 32/64/96) widens each scale's modules, stem branch and merge
    convs; a wrong count is a config error."""
    cfg = load_config(None, ["data.input_size=64", "model.channels=16", "model.stage_channels=[8,16,24]"])
    model = build_model(cfg.model, J, 64)
    assert [m.heatmaps.in_channels for m in model.hg_modules] == [8, 8, 16, 16, 16, 16, 24, 24]
    assert [c.out_channels for c in model.merge_features] == [8, 16, 16, 16, 16, 24, 24]
    stem = model.stem(torch.randn(1, 3, 64, 64))
    assert {k: tuple(v.shape[1:]) for k, v in stem.items()} == {"2": (8, 32, 32), "4": (16, 16, 16), "8": (24, 8, 8)}
    out = model(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(2, J, 32, 32)] * 2 + [(2, J, 16, 16)] * 4 + [(2, J, 8, 8)] * 2
    assert count_parameters(model) != count_parameters(build_model(load_config(
        None, ["data.input_size=64", "model.channels=16"]).model, J, 64))
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="model.stage_channels must give one width >= 1 per stage"):
        load_config(None, ["model.stage_channels=[8,16]"])


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_setting_changes_the_memory_order_not_the_result(channels_last):
    """train.channels_last: the normalised input is NHWC in memory (True) or NCHW-contiguous (False);
    the model's heatmaps are the same either way."""
    from pipeline.inputs import to_model_input

    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    x = to_model_input(images, channels_last)
    assert x.shape == (2, 3, 64, 64)
    assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert x.is_contiguous() == (not channels_last)
    model = small_model().eval()
    with torch.no_grad():
        reference = model(to_model_input(images, False).contiguous())
        for a, b in zip(model(x), reference):
            torch.testing.assert_close(a.contiguous(), b, rtol=1e-4, atol=1e-4)
