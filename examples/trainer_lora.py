"""transformers' Trainer with a petune LoRA adapter: a peft script with one import changed.

    python examples/trainer_lora.py [--model FOLDER] [--output DIR] [--max-steps N]

The model defaults to the embedded SmolLM2-135M-Instruct; the data is petune's demo chat records
(examples/_common.py: the command line and the data, shared by the three examples).
"""

from _common import command_line, demo_records
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from petune import LoraConfig, get_peft_model  # was: from peft import LoraConfig, get_peft_model

args = command_line(default_output="trainer-lora")
tokenizer = AutoTokenizer.from_pretrained(args.model)
lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model), lora)

data = demo_records().map(
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
