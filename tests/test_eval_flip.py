"""eval.flip=false: the evaluation without the flip test (issue 49). The loader evaluation (training's and
`mshg evaluate`'s) then runs the model once per batch, on the crops as they are, and its predictions are
the model's on those crops; with the flip test it runs twice and they differ."""
import torch

from pipeline.config import load_config
from pipeline.data import build_loader, unpack
from pipeline.evaluate import evaluate_loader
from pipeline.inference import predict_crops
from pipeline.model import build_model
from shards.format import ShardSet


def test_evaluation_without_flip_is_the_model_on_the_crops_once(lspet_shards):
    shards = ShardSet.open(lspet_shards["val"])
    torch.manual_seed(0)
    cfg = load_config(None, ["model.channels=16", "data.input_size=64", "data.num_threads=1", "eval.flip=false"])
    assert cfg.eval.flip is False
    model = build_model(cfg.model, len(shards.joints), 64)
    seen = []  # the first pixel row of every batch the model is given: tells a mirrored batch apart
    model.register_forward_hook(lambda module, args, out: seen.append(args[0][:, :, 0].clone()))

    def evaluate(flip: bool):
        seen.clear()
        loader = build_loader(shards, cfg.data, 8, False)
        cfg.eval.flip = flip
        return evaluate_loader(model, loader, cfg.eval, shards.flip_permutation(), progress=False), list(seen)

    plain, plain_inputs = evaluate(False)
    flipped, flipped_inputs = evaluate(True)
    assert len(plain) == shards.num_samples == 16
    assert len(flipped_inputs) == 2 * len(plain_inputs) == 4  # 2 batches of 8; the flip test doubles them
    assert all(torch.equal(a, b) for a, b in zip(plain_inputs, flipped_inputs[::2]))  # the same crops first
    assert not any(torch.equal(a, b) for a, b in zip(plain_inputs, flipped_inputs[1::2]))  # then mirrored
    # without flip: exactly the model's prediction on the crop
    for batch in build_loader(shards, cfg.data, 8, False):
        b = unpack(batch, torch.device("cpu"))
        expected = predict_crops(model.eval(), b["image"], None, cfg.eval.modules, cfg.eval.dark_kernel,
                                 cfg.eval.scales)
        for i, sid in enumerate(b["sample_id"].view(-1).tolist()):
            assert torch.equal(torch.from_numpy(plain[sid].pred), expected[i])
    assert any(not torch.equal(torch.from_numpy(plain[s].pred), torch.from_numpy(flipped[s].pred)) for s in plain)
