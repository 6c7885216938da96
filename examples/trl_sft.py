"""TRL's SFTTrainer with a petune LoRA adapter: a peft script with one import changed.

    python examples/trl_sft.py [--model FOLDER] [--output DIR] [--max-steps N]

The model defaults to the embedded SmolLM2-135M-Instruct; the data is petune's demo chat records
(conversational: TRL applies the chat template and, with `assistant_only_loss`, trains on the answers only).
examples/_common.py holds the command line and the data, shared by the three examples.
"""

from _common import command_line, demo_records, device_settings
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from petune import LoraConfig, get_peft_model  # was: from peft import LoraConfig, get_peft_model

args = command_line(default_output="trl-sft")
tokenizer = AutoTokenizer.from_pretrained(args.model)
lora = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
model = get_peft_model(AutoModelForCausalLM.from_pretrained(args.model), lora)

config = SFTConfig(
    args.output,
    max_steps=args.max_steps,
    per_device_train_batch_size=4,
    packing=True,
    max_length=256,
    **device_settings(),
)
trainer = SFTTrainer(model=model, args=config, train_dataset=demo_records(), processing_class=tokenizer)
trainer.train()
trainer.save_model(args.output)  # the adapter only
