"""Heatmap targets and the cascade loss."""
import pytest
import torch

from pipeline.inference import decode_heatmaps
from pipeline.targets import LossEmphasis, cascade_loss, joint_weights, make_targets, swap_flipped

pytestmark = pytest.mark.quick  # seconds each: `pytest -m quick` runs them

SIZE = 256
STRIDES = [2, 2, 4, 4, 4, 4, 8, 8]


def one_joint(x: float, y: float, labelled: float = 1.0) -> torch.Tensor:
    return torch.tensor([[[x, y, labelled]]])  # (B=1, J=1, 3)


def test_peak_sits_at_the_keypoint_at_every_resolution():
    x, y = 101.3, 57.8  # continuous crop coordinates
    heatmaps, weights = make_targets(one_joint(x, y), SIZE, STRIDES, sigma=2.0)
    assert sorted(heatmaps) == [2, 4, 8]
    for stride, hm in heatmaps.items():
        assert hm.shape == (1, 1, SIZE // stride, SIZE // stride)
        flat = int(hm.view(-1).argmax())
        row, col = divmod(flat, SIZE // stride)
        assert (col, row) == (int(x / stride), int(y / stride)), stride
        # decoding the target finds the keypoint again, within a quarter of a heatmap pixel
        decoded = decode_heatmaps(hm, stride)[0, 0]
        assert abs(decoded[0] - x) <= stride * 0.5 and abs(decoded[1] - y) <= stride * 0.5, stride
    assert weights.tolist() == [[1.0]]


def test_dark_decoding_recovers_sub_pixel_keypoints_the_quarter_offset_cannot():
    """DARK (eval.dark_kernel) on Gaussian targets at random sub-pixel positions: within 0.1 heatmap
    pixel, where the quarter offset errs up to 0.25+; at the border it falls back to the quarter offset."""
    g = torch.Generator().manual_seed(0)
    xy = 16 + torch.rand(1, 32, 2, generator=g) * 64  # away from the border of a 96-pixel crop
    kp = torch.cat([xy, torch.ones(1, 32, 1)], -1)
    hm = make_targets(kp, 96, [4], sigma=2.0)[0][4]
    quarter = (decode_heatmaps(hm, 4)[0, :, :2] - xy[0]).abs().max() / 4
    dark = (decode_heatmaps(hm, 4, dark_kernel=11)[0, :, :2] - xy[0]).abs().max() / 4
    assert dark < 0.1 < quarter, (dark, quarter)
    edge = make_targets(one_joint(1.3, 50.0), 96, [4], sigma=2.0)[0][4]  # argmax in column 0
    assert decode_heatmaps(edge, 4, 11)[0, 0, 0] == decode_heatmaps(edge, 4)[0, 0, 0]
    from pipeline.config import ConfigError, load_config

    assert load_config(None, ["eval.dark_kernel=5"]).eval.dark_kernel == 5
    for bad in (4, 1, -3):  # the blur needs an odd kernel of 3 or more; 0 is the quarter shift
        with pytest.raises(ConfigError, match="eval.dark_kernel must be 0"):
            load_config(None, [f"eval.dark_kernel={bad}"])


def test_gaussian_peak_is_one_at_a_pixel_centre_and_sigma_scales_with_stride():
    hm, _ = make_targets(one_joint(4 * 10 + 2, 4 * 20 + 2), SIZE, [4], sigma=2.0)  # centre of pixel (10, 20)
    assert torch.isclose(hm[4][0, 0, 20, 10], torch.tensor(1.0))
    assert torch.isclose(hm[4][0, 0, 20, 12], torch.exp(torch.tensor(-4.0 / 8.0)))  # 2 px away, sigma 2


def test_unlabelled_and_out_of_crop_joints_get_zero_weight_and_no_target():
    kp = torch.tensor([[[10.0, 10.0, 1.0], [10.0, 10.0, 0.0], [-3.0, 10.0, 1.0], [10.0, 300.0, 2.0]]])
    assert joint_weights(kp, SIZE).tolist() == [[1.0, 0.0, 0.0, 0.0]]
    heatmaps, _ = make_targets(kp, SIZE, STRIDES, sigma=2.0)
    for hm in heatmaps.values():
        assert hm[0, 0].max() > 0.5 and hm[0, 1:].abs().max() == 0


def test_invisible_joints_add_no_loss_and_each_module_has_its_loss():
    kp = torch.tensor([[[50.0, 60.0, 1.0], [70.0, 80.0, 0.0]]])
    heatmaps, weights = make_targets(kp, SIZE, STRIDES, sigma=2.0)
    preds = [torch.zeros(1, 2, SIZE // s, SIZE // s) for s in STRIDES]
    total, per_module = cascade_loss(preds, heatmaps, weights, STRIDES)
    assert len(per_module) == 8 and torch.isclose(total, torch.stack(per_module).sum())
    noisy = [p.clone() for p in preds]
    for p in noisy:
        p[:, 1] = torch.rand_like(p[:, 1]) * 5  # garbage on the invisible joint only
    total_noisy, _ = cascade_loss(noisy, heatmaps, weights, STRIDES)
    assert torch.equal(total, total_noisy)
    for p in noisy:
        p[:, 0] += 0.1  # but the visible joint counts
    assert cascade_loss(noisy, heatmaps, weights, STRIDES)[0] > total


def test_fg_weight_weighs_errors_near_a_joint_only():
    kp = torch.tensor([[[50.0, 60.0, 1.0]]])
    heatmaps, weights = make_targets(kp, SIZE, STRIDES, sigma=2.0)
    zeros = [torch.zeros(1, 1, SIZE // s, SIZE // s) for s in STRIDES]
    plain, _ = cascade_loss(zeros, heatmaps, weights, STRIDES)
    # predicting nothing misses the joint's Gaussian, ~95 % of whose squared mass lies in the disc that counts 11 times
    ratio = cascade_loss(zeros, heatmaps, weights, STRIDES, LossEmphasis(fg=10.0))[0] / plain
    assert 10 < ratio < 11
    far = [h.clone() for h in (heatmaps[s] for s in STRIDES)]
    for p in far:
        p[..., 0, 0] += 1.0  # an error in the background, far from the joint, weighs as before
    extra = cascade_loss(far, heatmaps, weights, STRIDES)[0]
    assert torch.isclose(cascade_loss(far, heatmaps, weights, STRIDES, LossEmphasis(fg=10.0))[0], extra)


def test_twin_weight_weighs_a_joint_put_on_its_twin_only():
    # joints 0/1 a left/right pair, joint 2 its own twin (a neck); truths far apart
    kp = torch.tensor([[[30.0, 30.0, 1.0], [90.0, 90.0, 1.0], [30.0, 90.0, 1.0]]])
    perm = [1, 0, 2]
    heatmaps, weights = make_targets(kp, SIZE, STRIDES, sigma=2.0)
    truth = [heatmaps[s] for s in STRIDES]
    loss = lambda preds, twin: cascade_loss(preds, heatmaps, weights, STRIDES, LossEmphasis(10.0, twin, perm))[0]  # noqa: E731
    double = [t.clone() for t in truth]
    for p, t in zip(double, truth):
        p[:, 0] += t[:, 1]  # the left joint also fires on the right one's truth: a double count
    # the error, ~95 % of its squared mass in the twin's disc, is background to joint 0: it counted 1, now 1 + 10
    assert loss(truth, 10.0) == 0
    assert 10 < loss(double, 10.0) / loss(double, 0.0) < 11
    elsewhere = [t.clone() for t in truth]
    for p in elsewhere:
        p[:, 0, 0, -1] += 1.0  # far from both truths: weighs as before
        p[:, 2] += p[:, 2].roll(3, -1)  # the neck (no twin) put beside itself: as before
    assert torch.isclose(loss(elsewhere, 10.0), loss(elsewhere, 0.0))
    with pytest.raises(ValueError, match="a twin weight needs flip_perm"):
        LossEmphasis(twin=10.0)


def test_flip_swaps_left_and_right_joints_only_for_flipped_samples():
    kp = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    out = swap_flipped(kp, torch.tensor([0.0, 1.0]), [1, 0, 2, 3])
    assert torch.equal(out[0], kp[0])
    assert torch.equal(out[1], kp[1][[1, 0, 2, 3]])
