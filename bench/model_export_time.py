"""How long a finished run's end spends logging its model, per config: the ONNX export, then
`mlflow.pytorch.log_model(..., serialization_format="pt2")` (torch.export with a dynamic batch), as
pipeline/track.py does it. Random weights: the time depends on the graph, not the values.

    python bench/model_export_time.py configs/lspet_gpu.yaml [--limit 300]

Stops with a traceback of every thread after --limit seconds (where it spends them, docs/gpu.md)."""
import argparse
import faulthandler
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("configs", nargs="+")
p.add_argument("--limit", type=int, default=300, help="seconds before a traceback dump and exit")
args = p.parse_args()
faulthandler.dump_traceback_later(args.limit, exit=True)

import mlflow  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.export import HeatmapModel, export_model_onnx  # noqa: E402
from pipeline.model import build_model  # noqa: E402

tmp = Path(tempfile.mkdtemp(prefix="export-time-"))
mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
for config in args.configs:
    cfg = load_config(config)
    model = build_model(cfg.model, 14, cfg.data.input_size).float().eval()
    t0 = time.perf_counter()
    export_model_onnx(model, cfg.data.input_size, tmp / f"{cfg.name}.onnx")
    onnx_s = time.perf_counter() - t0
    with mlflow.start_run(run_name=cfg.name):
        t0 = time.perf_counter()
        example = np.zeros((2, 3, cfg.data.input_size, cfg.data.input_size), np.float32)
        mlflow.pytorch.log_model(HeatmapModel(model).eval(), name="model", serialization_format="pt2",
                                 input_example=example)
        pt2_s = time.perf_counter() - t0
    print(f"{cfg.name}: ONNX export {onnx_s:.1f} s, MLflow pt2 model {pt2_s:.1f} s", flush=True)
