"""`mshg export --onnx`: the ONNX model's heatmaps match PyTorch's within 1e-4 on real image crops
(onnxruntime, CPU)."""
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from pipeline.cli import main as mshg
from pipeline.inputs import to_model_input
from pipeline.inference import crop, read_image
from pipeline.model_record import ModelRecord
from pipeline.weights import load_trained
from tests.conftest import SAMPLE
from tests.helpers import LSP_JOINTS

pytestmark = pytest.mark.quick  # seconds each: `pytest -m quick` runs them


def test_onnx_heatmaps_match_pytorch_on_real_images(weights, tmp_path):
    out = tmp_path / "model.onnx"
    assert mshg(["export", "--checkpoint", str(weights), "--onnx", str(out)]) == 0
    model, record = load_trained(weights)
    cfg, size = record.config, record.input_size
    crops = []
    for i in (161, 170, 185):
        image = read_image(str(SAMPLE / "images" / f"im{i:05d}.jpg"))
        crops.append(crop(image, [0, 0, image.shape[1], image.shape[0]], size, cfg.data.padding)[0])
    x = to_model_input(torch.from_numpy(np.stack(crops)))
    with torch.no_grad():
        expected = model(x)[-1].numpy()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"]
    got = session.run(["heatmaps"], {"image": x.numpy()})[0]  # a batch of 3: the batch axis is dynamic
    assert got.shape == expected.shape == (3, 14, size // 8, size // 8)
    assert np.abs(got - expected).max() < 1e-4
    assert np.abs(expected).max() > 1e-3  # not a trivially zero comparison
    props = session.get_modelmeta().custom_metadata_map
    assert json.loads(props["joints"]) == LSP_JOINTS and int(props["input_size"]) == size
    assert int(props["stride"]) == 8
    assert ModelRecord.read(props, str(out)) == record  # the weights file's record, config and skeleton included


def test_export_needs_something_to_do(weights, capsys):
    assert mshg(["export", "--checkpoint", str(weights)]) == 2
    assert "nothing to do" in capsys.readouterr().err


def test_export_and_predict_run_without_dali(weights, tmp_path):
    """ONNX export and `mshg predict` need no DALI: a process where importing nvidia.dali fails (as on a
    machine without it) exports and predicts; only the data pipeline needs DALI."""
    import subprocess
    import sys

    from tests.conftest import REPO

    image = str(SAMPLE / "images" / "im00161.jpg")
    script = (
        "import sys\n"
        "sys.modules['nvidia.dali'] = None  # `import nvidia.dali` now raises ImportError\n"
        "from pipeline.cli import main\n"
        f"assert main(['export', '--checkpoint', {str(weights)!r}, '--onnx', {str(tmp_path / 'm.onnx')!r}]) == 0\n"
        f"assert main(['predict', '--checkpoint', {str(weights)!r}, '--out', {str(tmp_path / 'p.json')!r}, {image!r}]) == 0\n"
        "assert not any(name.startswith('nvidia.dali.') for name in sys.modules), 'DALI was imported'\n"
        "try:\n"
        "    import pipeline.data\n"
        "except ImportError as e:\n"
        "    print('data pipeline:', e)\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NVIDIA DALI is missing" in proc.stdout  # the one module that needs it says so
    assert (tmp_path / "m.onnx").stat().st_size > 10_000
    assert len(json.loads((tmp_path / "p.json").read_text())["predictions"]) == 1
