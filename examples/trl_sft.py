"""TRL's SFTTrainer with a petune LoRA adapter: a peft script with one import changed.

    python examples/trl_sft.py [--model FOLDER] [--output DIR] [--max-steps N]

The model defaults to the embedded SmolLM2-135M-Instruct; the data is petune's demo chat records
(conversational: TRL applies the chat template and, with `assistant_only_loss`, trains on the answers only).
"""

import argparse
from importlib.resources import files

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from petune import LoraConfig, get_peft_model  # was: from peft import LoraConfig, get_peft_model
from petune.embedded import embedded_model_dir

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
parser.add_argument("--output", default="trl-sft")
parser.add_argument("--max-steps", type=int, default=20)
args = parser.parse_args()
model_dir = args.model or embedded_model_dir()

tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
model = get_peft_model(
    model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
)

data = load_dataset("json", data_files=str(files("petune") / "data" / "demo_train.jsonl"), split="train")
on_cpu = not torch.cuda.is_available()
config = SFTConfig(
    args.output,
    max_steps=args.max_steps,
    per_device_train_batch_size=4,
    packing=True,
    max_length=256,
    use_cpu=on_cpu,
    bf16=not on_cpu,  # TRL's default; a CPU multiplies bf16 matrices slowly
)
trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
trainer.train()
trainer.save_model(args.output)  # the adapter only
