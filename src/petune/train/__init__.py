"""`petune train` and friends: data files -> tokenised examples -> a training loop -> an adapter folder.

data.py        JSONL/JSON/CSV records (prompt/completion, Alpaca, chat) -> token ids + loss masks
formats.py     Parquet/Arrow files, datasets folders, ShareGPT records
config.py      TrainConfig: every option, its default and help, YAML + dotted flag overrides
methods.py     `--method` name -> adapter config (and the 4-bit base for qlora)
objective.py   `--objective` sft | dpo: batches, loss and held-out metrics the loop uses
dpo.py         Direct Preference Optimization on prompt/chosen/rejected records
loop.py        the training loop, top to bottom
strategy.py    `--strategy` ddp | fsdp | zero2 | zero3: the accelerate engine of a run
engines.py     what differs per engine: backward and step, gathering and saving its state
trackers.py    `--report-to`: accelerate's trackers (TensorBoard, MLflow, trackio, W&B), offline
checkpoint.py  atomic checkpoints and resume
evaluate.py    held-out loss, generation and accuracy
commands.py    generate / chat / eval / merge
plot.py        the loss curve
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for (a file, a field, an option): shown as one line, no traceback."""
