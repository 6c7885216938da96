"""TRL's DPOTrainer with a petune LoRA adapter and no separate reference model: a peft script, one import changed.

    python examples/trl_dpo.py [--model FOLDER] [--output DIR] [--max-steps N]

As with peft, TRL keeps a frozen copy of the adapter ("ref") as the reference instead of a second model.
The preference pairs: the demo data's answer (chosen) against the same date a century off (rejected).
"""

import argparse
from importlib.resources import files

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from petune import LoraConfig, get_peft_model  # was: from peft import LoraConfig, get_peft_model
from petune.embedded import embedded_model_dir

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
parser.add_argument("--output", default="trl-dpo")
parser.add_argument("--max-steps", type=int, default=20)
args = parser.parse_args()
model_dir = args.model or embedded_model_dir()

tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
model = get_peft_model(
    model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
)


def preference(row):
    question, answer = row["messages"]
    wrong = str(int(answer["content"][:4]) - 100) + answer["content"][4:]
    return {"prompt": [question], "chosen": [answer], "rejected": [{"role": "assistant", "content": wrong}]}


data = load_dataset("json", data_files=str(files("petune") / "data" / "demo_train.jsonl"), split="train")
data = data.map(preference, remove_columns=["messages"])
on_cpu = not torch.cuda.is_available()
config = DPOConfig(
    args.output,
    max_steps=args.max_steps,
    per_device_train_batch_size=4,
    max_length=128,
    use_cpu=on_cpu,
    bf16=not on_cpu,  # TRL's default; a CPU multiplies bf16 matrices slowly
)
trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
trainer.train()
trainer.save_model(args.output)  # the adapter only
