"""What the three examples share and what is not their subject: the command line, the data, the device.

The command line: `--model FOLDER`, a causal LM folder (default: the embedded SmolLM2-135M-Instruct);
`--output DIR`, where the trainer writes checkpoints and the adapter; `--max-steps N`, optimizer steps.
"""

import argparse
from importlib.resources import files

import torch
from datasets import Dataset, load_dataset

from petune.embedded import embedded_model_dir


def command_line(default_output: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--output", default=default_output)
    parser.add_argument("--max-steps", type=int, default=20)
    args = parser.parse_args()
    args.model = args.model or embedded_model_dir()
    return args


def demo_records() -> Dataset:
    """petune's demo chats, `{"messages": [user, assistant]}` (converting dates to ISO), as a datasets.Dataset."""
    return load_dataset("json", data_files=str(files("petune") / "data" / "demo_train.jsonl"), split="train")


def device_settings() -> dict:
    """TRL's default precision (bf16) on a GPU; fp32 on a CPU, which multiplies bf16 matrices slowly."""
    on_cpu = not torch.cuda.is_available()
    return {"use_cpu": on_cpu, "bf16": not on_cpu}
