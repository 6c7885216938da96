"""`--report-to`: the rows of metrics.jsonl sent to experiment trackers as well, through accelerate's trackers.

Offline only: nothing leaves the machine, every tracker writes under the run folder.

    tensorboard   <run>/tensorboard/      event files (`tensorboard --logdir <run>/tensorboard`)
    wandb         <run>/wandb/            an offline run (`wandb sync <run>/wandb/offline-run-*` uploads it later)
    mlflow        <run>/mlruns/           a local file store (`mlflow ui --backend-store-uri <run>/mlruns`)
    trackio       <run>/trackio/          trackio's local database (`TRACKIO_DIR=<run>/trackio trackio show`)

Each is accelerate's own tracker class (`accelerate.tracking`), handed to `Accelerator(log_with=...)`;
`init_trackers` starts them on the main process, `accelerator.log` writes a row, `end_training` closes them.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

from petune.train import UserError

PROJECT = "petune"  # the wandb/trackio project and mlflow experiment name


def make_trackers(names: list[str], run_dir: Path) -> list[GeneralTracker]:
    """accelerate's tracker for each name, set up to write under `run_dir`; none for `none`."""
    trackers: list[GeneralTracker] = []
    for name in (n for n in names if n != "none"):
        if importlib.util.find_spec(name) is None:  # each tracker's module and pip package bear its name
            raise UserError(f"--report-to {name} needs the {name} package, not installed: pip install {name}")
        trackers.append(_tracker(name, run_dir))
    return trackers


def _tracker(name: str, run_dir: Path) -> GeneralTracker:
    if name == "tensorboard":
        return TensorBoardTracker("tensorboard", run_dir)  # writes to <run_dir>/tensorboard
    if name == "wandb":
        return WandBTracker(PROJECT, dir=str(run_dir), mode="offline")
    if name == "mlflow":
        # accelerate's MLflowTracker takes its store from mlflow's environment variable; mlflow 3 keeps the
        # file store (in maintenance) behind an opt-in, which a folder of files needs no server or database for
        os.environ["MLFLOW_TRACKING_URI"] = (run_dir.resolve() / "mlruns").as_uri()
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
        return MLflowTracker(PROJECT)
    os.environ["TRACKIO_DIR"] = str(run_dir.resolve() / "trackio")  # read when trackio is imported, in start()
    return TrackioTracker(PROJECT)


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """The run's options as flat `section.name: value` pairs of the types every tracker takes (no None, no lists)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{sub}": item for sub, item in hyperparameters(value).items()})
        elif isinstance(value, list):
            flat[key] = ",".join(str(item) for item in value)
        else:
            flat[key] = "none" if value is None else value
    return flat


def start(accelerator: Accelerator, config: dict[str, Any]) -> None:
    """Start the trackers (main process) with the run's options as hyperparameters."""
    if accelerator.log_with:
        accelerator.init_trackers(PROJECT, config=hyperparameters(config))


def logger(accelerator: Accelerator) -> Callable[[dict[str, Any]], None] | None:
    """What sends one metrics.jsonl row to the trackers: every value but `step`, at that step; None without any."""
    if not accelerator.log_with:
        return None

    def log(row: dict[str, Any]) -> None:
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    return log
