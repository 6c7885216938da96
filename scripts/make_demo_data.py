"""Write petune's bundled demo data set: dates in words -> ISO 8601 (YYYY-MM-DD), as chat records.

SmolLM2-135M-Instruct answers these by repeating the date (0% exact match); a LoRA learns the format
and the month numbers in a few dozen steps. Deterministic: rerunning writes the same files.

    python scripts/make_demo_data.py     # -> src/petune/data/demo_train.jsonl, demo_val.jsonl
"""

from __future__ import annotations

import calendar
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src" / "petune" / "data"
TRAIN_SIZE, VAL_SIZE = 400, 60
MONTHS = list(calendar.month_name)[1:]
QUESTIONS = [
    "Convert this date to ISO format: {date}",
    "Write {date} as an ISO 8601 date.",
    "What is {date} in YYYY-MM-DD form?",
]


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spoken(year: int, month: int, day: int, style: int) -> str:
    name = MONTHS[month - 1]
    return [
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"the {ordinal(day)} of {name}, {year}",
        f"{name[:3]} {day} {year}",
    ][style]


def main() -> None:
    rng = random.Random(2024)
    seen: set[tuple[int, int, int]] = set()
    records = []
    while len(records) < TRAIN_SIZE + VAL_SIZE:
        year, month = rng.randint(1900, 2099), rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        if (year, month, day) in seen:
            continue  # every date appears once: the held-out dates are new to the model
        seen.add((year, month, day))
        question = rng.choice(QUESTIONS).format(date=spoken(year, month, day, rng.randrange(4)))
        answer = f"{year:04d}-{month:02d}-{day:02d}"
        records.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]})
    OUT.mkdir(parents=True, exist_ok=True)
    for name, part in (("demo_train.jsonl", records[:TRAIN_SIZE]), ("demo_val.jsonl", records[TRAIN_SIZE:])):
        (OUT / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        print(f"wrote {len(part)} records to {OUT / name}")


if __name__ == "__main__":
    main()
