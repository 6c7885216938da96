"""Chat records of varied length, ~40 to ~1000 tokens each, for measuring packing (`benchmarks/e2e_trl.py`).

Each record asks for a list of words in reverse order and answers with it; the word count is drawn
log-uniformly, so short records are common and long ones rare, as in chat data. Deterministic for a seed.

    python benchmarks/chat_lengths.py /tmp/chats.jsonl --records 400   # prints the token lengths it made
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path
from typing import Any

WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "orange",
    "silver",
    "thunder",
    "candle",
    "forest",
    "mirror",
    "bridge",
    "pepper",
    "lantern",
    "meadow",
    "harbor",
    "violet",
    "copper",
    "falcon",
    "pebble",
    "canyon",
    "saddle",
    "velvet",
    "maple",
    "glacier",
    "rocket",
    "walnut",
    "timber",
    "comet",
]
MIN_WORDS, MAX_WORDS = 1, 480  # SmolLM2 tokens with its chat template (and default system prompt): ~40 to ~1000


def chat(rng: random.Random) -> dict[str, Any]:
    count = round(math.exp(rng.uniform(math.log(MIN_WORDS), math.log(MAX_WORDS))))
    words = [rng.choice(WORDS) for _ in range(count)]
    question = "Write these words in reverse order: " + " ".join(words)
    answer = " ".join(reversed(words))
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = [chat(rng) for _ in range(args.records)]
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))

    from transformers import AutoTokenizer

    from petune.embedded import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    texts = [tokenizer.apply_chat_template(row["messages"], tokenize=False) for row in rows]
    lengths = sorted(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)
    print(f"{args.out}: {len(rows)} records, tokens min {lengths[0]} median {statistics.median(lengths):.0f} "
          f"mean {statistics.mean(lengths):.0f} max {lengths[-1]}")  # fmt: skip


if __name__ == "__main__":
    main()
