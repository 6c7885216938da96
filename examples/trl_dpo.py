"""TRL's DPOTrainer with a petune LoRA adapter and no separate reference model: a peft script, one import changed.

    python examples/trl_dpo.py [--model FOLDER] [--output DIR] [--max-steps N]

As with peft, TRL keeps a frozen copy of the adapter ("ref") as the reference instead of a second model.
The preference pairs: the demo data's answer (chosen) against the same date a century off (rejected).
examples/_common.py holds the command line and the data, shared by the three examples.
"""

from _common import command_line, demo_records, device_settings
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

from petune import LoraConfig, get_peft_model  # was: from peft import LoraConfig, get_peft_model

args = command_line(default_output="trl-dpo")
tokenizer = AutoTokenizer.from_pretrained(args.model)
lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model), lora)


def preference(row):
    question, answer = row["messages"]
    wrong = str(int(answer["content"][:4]) - 100) + answer["content"][4:]
    return {"prompt": [question], "chosen": [answer], "rejected": [{"role": "assistant", "content": wrong}]}


data = demo_records().map(preference, remove_columns=["messages"])
config = DPOConfig(
    args.output, max_steps=args.max_steps, per_device_train_batch_size=4, max_length=128, **device_settings()
)
trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
trainer.train()
trainer.save_model(args.output)  # the adapter only
