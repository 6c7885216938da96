"""`--objective dpo`: log 2 at LoRA's init, the preference margin rises, the reference is the adapter switched off."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from petune import LoraConfig, PromptTuningConfig, TaskType, get_peft_model
from petune.cli import main
from petune.train import UserError
from petune.train.config import build_config
from petune.train.dpo import DpoObjective, collate_pairs, dpo_loss, load_preferences, parse_pair, sequence_logps
from tests.train.tiny import write_jsonl

QUICK = ["--eval-samples", "0", "--eval-before", "false", "--save-every", "0", "--max-length", "64"]


def preference_rows(count: int, start: int = 0) -> list[dict[str, object]]:
    """Dates to rewrite in ISO form: chosen is ISO, rejected the US form of the same date."""
    rows: list[dict[str, object]] = []
    for i in range(start, start + count):
        year, day = 1990 + i, i % 28 + 1
        prompt = f"Write March {day}, {year} as YYYY-MM-DD: "
        rows.append({"prompt": prompt, "chosen": f"{year}-03-{day:02d}", "rejected": f"03/{day:02d}/{year}"})
    return rows


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("preferences")
    return write_jsonl(folder / "train.jsonl", preference_rows(16)), write_jsonl(
        folder / "val.jsonl", preference_rows(8, 50)
    )


def dpo_args(model: Path, data: tuple[Path, Path], output: Path, *extra: str) -> list[str]:
    return [
        "train", "--objective", "dpo", "--model", str(model), "--data", str(data[0]), "--val-data", str(data[1]),
        "--output", str(output), "--batch-size", "4", *QUICK, *extra,
    ]  # fmt: skip


def read_rows(run: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_lora_dpo_starts_at_log_2_and_learns_the_preference(
    tiny_model_dir: Path, preference_data: tuple[Path, Path], tmp_path: Path
) -> None:
    args = ["--max-steps", "12", "--eval-every", "6", "--lr", "1e-2", "--lora.target-modules", "all-linear"]
    assert main(dpo_args(tiny_model_dir, preference_data, tmp_path / "run", *args)) == 0
    rows = read_rows(tmp_path / "run")
    steps = [row for row in rows if "loss" in row]
    evaluations = [row for row in rows if "eval_loss" in row]
    # a fresh LoRA adapter (B = 0) computes what the reference does: every reward is 0, the loss log 2
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert steps[-1]["loss"] < math.log(2) - 0.05 and steps[-1]["rewards/margins"] > 0.1
    assert [row["step"] for row in evaluations] == [6, 12]
    assert evaluations[-1]["eval_rewards/accuracies"] == 1.0 and evaluations[-1]["eval_loss"] < math.log(2)
    assert evaluations[-1]["eval_rewards/margins"] > 0.1
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_prompt_tuning_dpo_trains(tiny_model_dir: Path, preference_data: tuple[Path, Path], tmp_path: Path) -> None:
    args = ["--method", "prompt", "--prompt.num-virtual-tokens", "4", "--max-steps", "2", "--eval-every", "0"]
    assert main(dpo_args(tiny_model_dir, preference_data, tmp_path / "run", *args)) == 0
    rows = read_rows(tmp_path / "run")
    assert all(math.isfinite(row.get("loss", row.get("eval_loss", math.nan))) for row in rows)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_the_reference_is_the_base_model(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path, method: str
) -> None:
    """DpoObjective's reference log-probs are the plain base model's, whatever the adapter has learnt."""
    path = write_jsonl(tmp_path / "p.jsonl", preference_rows(3))
    pairs = load_preferences(tokenizer, str(path), None, 0.0, max_length=64).train
    batch = collate_pairs(pairs, tokenizer.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    expected = sequence_logps(base, batch)
    config = (
        LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, init_lora_weights=False)  # a non-zero update
        if method == "lora"
        else PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=4)
    )
    model = get_peft_model(base, config)
    loss, _ = DpoObjective(beta=0.1).loss_sum(model, model, batch)
    policy = sequence_logps(model, batch)
    assert not torch.allclose(policy, expected)  # the adapter changes the policy...
    with model.disable_adapter():
        torch.testing.assert_close(sequence_logps(model, batch), expected)  # ...and switched off is the base
    reference_loss, _ = dpo_loss(policy, expected, beta=0.1)
    torch.testing.assert_close(loss, reference_loss.sum())


def test_sequence_logps_sum_the_completion_tokens(
    tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", preference_rows(1))
    batch = collate_pairs(load_preferences(tokenizer, str(path), None, 0.0, 64).train, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for row in range(2):  # chosen, rejected
        labels = batch["labels"][row]
        by_hand = sum(
            F.log_softmax(logits[row, position - 1], dim=-1)[labels[position]].item()
            for position in range(1, labels.shape[0])
            if labels[position] != -100
        )
        assert sequence_logps(model, batch)[row].item() == pytest.approx(by_hand, abs=1e-4)


def test_conversational_pairs_use_the_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    row = {
        "prompt": [{"role": "user", "content": "2 + 2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    chosen, rejected = parse_pair(row, "x:1", tokenizer)
    assert chosen.templated and chosen.reference == "4" and rejected.reference == "5"
    assert (
        chosen.prompt
        == rejected.prompt
        == tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    )
    text = parse_pair({"prompt": "2 + 2 =", "chosen": " 4", "rejected": " 5"}, "x:1", tokenizer)
    assert [r.segments for r in text] == [[("2 + 2 =", False), (" 4", True)], [("2 + 2 =", False), (" 5", True)]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "full"}, "--method full has no adapter: choose an adapter method"),
        ({"packing": True}, "drop --packing"),
        ({"dpo": {"beta": 0}}, "--dpo.beta must be positive"),
        ({"objective": "ppo"}, "--objective 'ppo' is unknown; choose one of: sft, dpo"),
    ],
)
def test_bad_dpo_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_config({"objective": "dpo", **options})


def test_bad_preference_records(tmp_path: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    path = write_jsonl(tmp_path / "p.jsonl", [*preference_rows(1), {"prompt": "a", "chosen": "b"}])
    with pytest.raises(UserError, match=rf"{path}:2: a preference record needs prompt, chosen and rejected; it has"):
        load_preferences(tokenizer, str(path), None, 0.0, 64)
    with pytest.raises(UserError, match="--objective dpo needs --data"):
        load_preferences(tokenizer, None, None, 0.0, 64)
    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello", "rejected": []}
    with pytest.raises(UserError, match=r"x:1: with a conversational prompt .* 'chosen' must be a list too"):
        parse_pair(row, "x:1", tokenizer)


def test_the_loss_is_trls_dpo_loss(tiny_model_dir: Path, tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    """petune's DPO loss on TRL's own batch of a peft LoRA adapter equals TRL DPOTrainer's loss."""
    trl = pytest.importorskip("trl")
    peft = pytest.importorskip("peft")
    import datasets

    torch.manual_seed(0)
    # TRL adds the adapter itself (given a PeftModel it would take that adapter's start as the reference);
    # init_lora_weights=False: a random, non-zero update, so the policy differs from the reference
    config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False, target_modules=["q_proj", "v_proj"])
    rows = preference_rows(4)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, report_to=[], use_cpu=True, max_length=64)
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=config,
    )
    trainer.model.save_pretrained(tmp_path / "adapter")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch)

    from petune import PeftModel

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter").eval()
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    ours = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}
    with torch.no_grad():
        loss_sum, _ = DpoObjective(beta=0.1).loss_sum(model, model, ours)
    assert abs(trl_loss.item() - math.log(2)) > 1e-3  # the adapter moved the policy from the reference
    assert loss_sum.item() / len(rows) == pytest.approx(trl_loss.item(), abs=1e-5)


def test_accumulated_micro_batches_give_the_big_batchs_step(
    tiny_model_dir: Path, preference_data: tuple[Path, Path], tmp_path: Path
) -> None:
    """The loss is a mean over the global batch's pairs, however the batch is split."""
    args = ["--max-steps", "3", "--eval-every", "0", "--lr", "1e-2"]
    assert main(dpo_args(tiny_model_dir, preference_data, tmp_path / "big", *args)) == 0
    split = ["--batch-size", "2", "--grad-accum", "2"]
    assert main(dpo_args(tiny_model_dir, preference_data, tmp_path / "acc", *args, *split)) == 0
    big, accumulated = (read_rows(tmp_path / name) for name in ("big", "acc"))
    for key in ("loss", "grad_norm", "rewards/margins", "rewards/accuracies"):
        assert [row.get(key) for row in big] == pytest.approx([row.get(key) for row in accumulated], abs=1e-5)
    assert len(big) == 4 and big[2]["loss"] != big[0]["loss"]  # 3 steps, then the held-out evaluation
