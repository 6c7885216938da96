"""transformers' Trainer with a petune LoRA adapter: a peft script with one import changed.

    python examples/trainer_lora.py [--model FOLDER] [--output DIR] [--max-steps N]

The model defaults to the embedded SmolLM2-135M-Instruct; the data is petune's demo chat records.
"""

import argparse
from importlib.resources import files

from datasets import load_dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from petune import LoraConfig, get_peft_model  # was: from peft import LoraConfig, get_peft_model
from petune.embedded import embedded_model_dir

parser = argparse.ArgumentParser()
parser.add_argument("--model", default=None)
parser.add_argument("--output", default="trainer-lora")
parser.add_argument("--max-steps", type=int, default=20)
args = parser.parse_args()
model_dir = args.model or embedded_model_dir()

tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
model = get_peft_model(
    model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
)

data = load_dataset("json", data_files=str(files("petune") / "data" / "demo_train.jsonl"), split="train")
data = data.map(
    lambda row: tokenizer.apply_chat_template(row["messages"], return_dict=True), remove_columns=["messages"]
)

trainer = Trainer(
    model=model,
    args=TrainingArguments(args.output, max_steps=args.max_steps, per_device_train_batch_size=4, learning_rate=2e-4),
    train_dataset=data,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
)
trainer.train()
trainer.save_model(args.output)  # adapter_config.json + adapter_model.safetensors, as peft writes them
