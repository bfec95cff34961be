"""Fine-tuning (`train.init_from`): trained weights copied in with joints matched by name, fresh heads for the
joints they do not know, another architecture refused by its first differing layer; and in a real run the
first step's loss shows the weights were loaded."""
import pytest
import torch

from pipeline.config import load_config
from pipeline.model import build_model
from pipeline.weights import DEFAULT_MODEL, init_from, save_weights, shipped_models
from shards.datasets import COCO_JOINTS, MPII_JOINTS
from tests.helpers import LSP_JOINTS, REPO, find_run, lsp_record, metric_history, train

TINY = ["name=tiny", "model.channels=16", "data.input_size=64"]


@pytest.fixture
def lsp_weights(tmp_path):
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, 14, 64)
    with torch.no_grad():  # BatchNorm statistics as a trained model has them, not the fresh ones
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.uniform_(0.5, 1.5)
    return save_weights(model.state_dict(), tmp_path / "lsp.safetensors", lsp_record(cfg)), model


@pytest.mark.quick
def test_joints_are_matched_by_name_and_unknown_joints_keep_fresh_heads(lsp_weights):
    path, trained = lsp_weights
    cfg = load_config(None, TINY)
    torch.manual_seed(1)
    model = build_model(cfg.model, 17, 64)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    note = init_from(model, str(path), list(COCO_JOINTS))
    assert "12 of 17 joints matched by name" in note and "fresh heads for nose, left_eye, right_eye, left_ear, " \
        "right_ear" in note
    got, theirs = model.state_dict(), trained.state_dict()
    for new, name in enumerate(COCO_JOINTS):
        for key in ("hg_modules.7.heatmaps.weight", "hg_modules.0.heatmaps.bias"):
            expected = theirs[key][LSP_JOINTS.index(name)] if name in LSP_JOINTS else fresh[key][new]
            assert torch.equal(got[key][new], expected), (key, name)
        column = got["merge_heatmaps.3.weight"][:, new]
        expected = theirs["merge_heatmaps.3.weight"][:, LSP_JOINTS.index(name)] if name in LSP_JOINTS else \
            fresh["merge_heatmaps.3.weight"][:, new]
        assert torch.equal(column, expected), name
    # everything that does not depend on the joints is the trained model's, BatchNorm statistics included
    for key in ("stem.conv.0.weight", "hg_modules.4.features.1.running_var", "merge_features.0.bias"):
        assert torch.equal(got[key], theirs[key])
        assert not torch.equal(got[key], fresh[key])


@pytest.mark.quick
@pytest.mark.parametrize("override, message", [
    ("model.channels=32", r"layer stem\.conv\.0\.weight is \(4, 3, 7, 7\) in the weights but \(8, 3, 7, 7\)"),
    ("data.input_size=128", r"lack layer hg_modules\.0\.hourglass\.\S+|have layer hg_modules\.\S+ that this model lacks"),
])
def test_a_model_of_another_shape_is_refused_naming_the_first_differing_layer(lsp_weights, override, message):
    path, _ = lsp_weights
    cfg = load_config(None, [*TINY, override])
    model = build_model(cfg.model, 14, cfg.data.input_size)
    with pytest.raises(ValueError, match=message):
        init_from(model, str(path), LSP_JOINTS)


@pytest.mark.quick
def test_weights_sharing_no_joint_name_are_refused(lsp_weights):
    path, _ = lsp_weights
    model = build_model(load_config(None, TINY).model, 3, 64)
    with pytest.raises(ValueError, match="none of the dataset's joints"):
        init_from(model, str(path), ["a", "b", "c"])


def first_loss(tmp_path, name: str) -> float:
    """The run's loss at step 1 (train.log_every=1), as MLflow has it: the forward of the initial weights."""
    client, run = find_run(tmp_path, name)
    return next(value for step, value in metric_history(client, run.info.run_id, "loss/total") if step == 1)


def test_fine_tuning_from_the_shipped_model_starts_far_below_a_fresh_model(lspet_shards, mpii_shards, tmp_path):
    """The shipped model's config (configs/lspet_cpu.yaml's architecture) on the held-out sample photographs:
    its first step's loss (before any update) is far below the same run's from random weights; on MPII's 16
    joints the 13 LSP names match and pelvis, thorax and upper_neck start fresh, and it still starts lower."""
    assert DEFAULT_MODEL in shipped_models()
    config = REPO / "configs" / "lspet_cpu.yaml"
    common = ["stop.max_steps=1", "stop.max_minutes=0", "train.log_every=1", "train.eval_every=0",
              "train.checkpoint_every=0", "train.micro_batch=8", "train.log_model=false", "train.cpu_threads=1",
              "train.ema_decay=0", "data.val_shards=", "data.num_threads=1", "data.whole_image_prob=0"]
    losses = {}
    for name, shards, init in [("scratch", lspet_shards["val"], ""), ("tuned", lspet_shards["val"], DEFAULT_MODEL),
                               ("mpii-scratch", mpii_shards, ""), ("mpii-tuned", mpii_shards, DEFAULT_MODEL)]:
        proc = train(tmp_path, config, *common, f"data.train_shards={shards}", f"train.run_name={name}",
                     f"train.init_from={init}")
        output = proc.stdout + proc.stderr
        losses[name] = first_loss(tmp_path, name)
        if name == "mpii-tuned":
            assert f"13 of 16 joints matched by name; fresh heads for pelvis, thorax, upper_neck" in output
    assert losses["tuned"] < 0.5 * losses["scratch"], losses
    assert losses["mpii-tuned"] < 0.8 * losses["mpii-scratch"], losses
    assert len(MPII_JOINTS) == 16
