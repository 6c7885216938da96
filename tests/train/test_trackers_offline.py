"""`--report-to wandb,mlflow`: each tracker's offline record, read back with its own library, holds metrics.jsonl.

One short run feeds both (wandb offline under <run>/wandb, an mlflow file store under <run>/mlruns). trackio is
not tested: trackio 0.43 wants pillow<13 (the dev set has 13.0.0); README says more.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from wandb.proto import wandb_internal_pb2

from petune.cli import main
from tests.train.test_trackers import QUICK
from tests.train.tiny import tiny_args

KEYS = ("loss", "lr", "grad_norm", "eval_loss")
# wandb's transaction log (run-<id>.wandb): a 7-byte file header, then LevelDB-log blocks whose records (4-byte
# checksum, 2-byte little-endian length, 1-byte type) carry wandb's `Record` protobufs, split across blocks.
BLOCK, HEADER, FULL, FIRST, MIDDLE, LAST = 32768, 7, 1, 2, 3, 4


@pytest.fixture(scope="module")
def run(tiny_model_dir: Path, tiny_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trackers") / "run"
    with pytest.MonkeyPatch.context() as env:  # the trackers set these; put them back afterwards
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE"):
            env.setenv(name, "")
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_CONFIG_DIR", str(run.parent / "wandb-config"))
        env.setenv("WANDB_CACHE_DIR", str(run.parent / "wandb-cache"))
        assert main([*tiny_args(tiny_model_dir, tiny_data, run), *QUICK, "--report-to", "wandb,mlflow"]) == 0
    return run


def expected(run: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    values = {row["step"]: row[key] for row in rows if key in row}
    assert len(values) >= 2, key
    return values


def wandb_records(path: Path) -> list[bytes]:
    data, records, parts, position = path.read_bytes(), [], b"", HEADER
    while position + HEADER <= len(data):
        if BLOCK - position % BLOCK < HEADER:  # the block's tail is padding
            position += BLOCK - position % BLOCK
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        parts += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            records.append(parts)
            parts = b""
        elif kind not in (FIRST, MIDDLE):
            break
    return records


def test_wandb_offline_run_holds_the_metrics(run: Path) -> None:
    history: dict[int, dict[str, float]] = {}
    for data in wandb_records(next(run.glob("wandb/offline-run-*/run-*.wandb"))):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
    for key in KEYS:
        assert {step: row[key] for step, row in history.items() if key in row} == expected(run, key), key


def test_mlflow_file_store_holds_the_metrics(run: Path) -> None:
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("petune")
    (only,) = client.search_runs([experiment.experiment_id])
    for key in KEYS:
        metrics = client.get_metric_history(only.info.run_id, key)
        assert {metric.step: metric.value for metric in metrics} == expected(run, key), key
    assert only.data.params["lora.r"] == "8"
