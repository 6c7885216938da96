"""`petune export` of the demo adapter in llama.cpp: file size, tokens/s and held-out exact match per outtype.

Run: `python benchmarks/export_gguf.py --adapter RUN/adapter --records 20 --threads 1` (BENCHMARKS.md's table;
about 3 minutes per model on 2 cores shared with other work), after `petune train` (the demo: no arguments) and
`make llama-cpp`. For each outtype it exports the merged model (`petune export
--format gguf`), then llama.cpp (llama-cpp-python) answers each held-out record of the demo data greedily,
from the chat-templated prompt tokenised by the HF tokenizer, with as many new tokens as `petune eval` gives
(the longest reference + 4). Exact match is `petune eval`'s (whitespace-trimmed equality). Decode tokens/s
counts the tokens after the first (the first one also pays for the prompt). The base model (no adapter,
f16) is scored the same way, for the "before".
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import llama_cpp
from transformers import AutoTokenizer

from petune.cli import main
from petune.embedded import embedded_model_dir
from petune.train.data import load_records
from petune.train.evaluate import score

DEMO_VAL = Path(__file__).resolve().parents[1] / "src" / "petune" / "data" / "demo_val.jsonl"


def answers(model: Path, prompts: list[list[int]], limit: int, eos: int, threads: int) -> dict[str, Any]:
    """Greedy answers from llama.cpp and the decode speed (tokens after each answer's first, per second)."""
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=512, n_threads=threads, verbose=False)
    texts: list[list[int]] = []
    decode_tokens, decode_seconds = 0, 0.0
    for ids in prompts:
        llm.reset()
        tokens: list[int] = []
        first = 0.0
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if not tokens:
                first = time.perf_counter()
            if token == eos:
                break
            tokens.append(int(token))
            if len(tokens) == limit:
                break
        decode_seconds += time.perf_counter() - first
        decode_tokens += max(len(tokens) - 1, 0)
        texts.append(tokens)
    return {"tokens": texts, "decode_tokens_per_s": decode_tokens / decode_seconds}


def export(work: Path, outtype: str, adapter: str | None) -> Path:
    path = work / (f"{outtype}.gguf" if adapter else f"base-{outtype}.gguf")
    args = ["export", "--format", "gguf", "--outtype", outtype, "--output", str(path), "--overwrite"]
    assert main([*args, *(["--adapter", adapter] if adapter else [])]) == 0
    return path


def run(
    adapter: str,
    work: Path,
    outtypes: list[str],
    sizes_only: list[str],
    threads: int,
    with_base: bool,
    count: int | None,
) -> list[dict[str, Any]]:
    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir())
    records = load_records(DEMO_VAL, tokenizer)[:count]
    prompts = [list(tokenizer(r.prompt, add_special_tokens=False)["input_ids"]) for r in records]
    references = [r.reference for r in records]
    limit = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 4
    rows = []
    for outtype in sizes_only:
        path = export(work, outtype, adapter)
        print(json.dumps({"model": outtype, "size_mb": round(path.stat().st_size / 1e6, 1)}), flush=True)
    base = [("base", "f16", None)] if with_base else []
    for label, outtype, with_adapter in [*base, *((o, o, adapter) for o in outtypes)]:
        path = export(work, outtype, with_adapter)
        result = answers(path, prompts, limit, tokenizer.eos_token_id, threads)
        predictions = [tokenizer.decode(t, skip_special_tokens=True) for t in result["tokens"]]
        row = {
            "model": label,
            "size_mb": round(path.stat().st_size / 1e6, 1),
            "decode_tokens_per_s": round(result["decode_tokens_per_s"], 1),
            **{k: round(v, 4) for k, v in score(predictions, references).items()},
            "first_question": records[0].question,
            "first_answer": predictions[0],
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True, help="the demo run's adapter (petune train, no arguments)")
    parser.add_argument("--work", default="runs/export-bench", help="folder for the GGUF files")
    parser.add_argument("--outtypes", default="f16,q8_0,q4_0", help="exported and run in llama.cpp")
    parser.add_argument("--sizes-only", default="f32,bf16", help="exported for their file size only")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-base", action="store_true", help="skip scoring the base model")
    parser.add_argument("--records", type=int, default=None, help="score the first N held-out records (default: all)")
    options = parser.parse_args()
    Path(options.work).mkdir(parents=True, exist_ok=True)
    sizes, outtypes = ([o for o in text.split(",") if o] for text in (options.sizes_only, options.outtypes))
    run(options.adapter, Path(options.work), outtypes, sizes, options.threads, not options.no_base, options.records)
