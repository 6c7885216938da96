"""Where a `petune train --strategy` process's memory goes, phase by phase: VmRSS, RssAnon (anonymous memory),
RssFile (mapped files: libraries, the model file) and the peak since the previous mark, in every process.

Each process is `petune train` (the command of benchmarks/engines.py, on mimalloc as `petune` runs) with marks
around the loop's phases (accelerator, model load, adapter, optimizer), accelerate's preparation (`_prepare_fsdp2`,
`_get_named_parameters`, `fsdp2_prepare_model`), each backward and optimizer step, the end-of-run evaluation and
save; `--groups` adds every FSDP2 group's unshard/reshard. The peak is reset at each mark (/proc/self/clear_refs),
so each line's `peak` is the high-water mark since the line before. Linux only.

    python benchmarks/engines_trace.py --strategy fsdp --steps 3
    python benchmarks/engines_trace.py --strategy zero3 --nproc 2 --model MODEL_FOLDER
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from e2e_trl import environment

FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")


def mark(name: str) -> None:
    """One line on stderr: this process's resident memory now (MiB) and its peak since the previous mark."""
    with open("/proc/self/status") as status:
        found = {k: int(v.split()[0]) // 1024 for k, _, v in (line.partition(":") for line in status) if k in FIELDS}
    rss, anon, files, peak = (found[k] for k in FIELDS)
    rank = os.environ.get("RANK", "0")
    print(f"[rank {rank}] {name:40s} rss {rss:5d} anon {anon:5d} file {files:5d} peak {peak:5d}", file=sys.stderr)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the peak (VmHWM)


def wrap(owner: Any, name: str, before: bool = False) -> None:
    """Mark after (and with `before`, also before) every call of `owner.name`."""
    original: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(original)
    def marked(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(f"before {name}")
        result = original(*args, **kwargs)
        mark(f"after {name}")
        return result

    setattr(owner, name, marked)


def trace_groups() -> None:
    """Mark every FSDP2 group's unshard, wait_for_unshard and reshard, with the group's first parameter."""
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    for name in ("unshard", "wait_for_unshard", "reshard"):
        original = getattr(FSDPParamGroup, name)

        def marked(self: Any, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            result = _original(self, *args, **kwargs)
            first = self.fsdp_params[0]._param_fqn if self.fsdp_params else ""
            mark(f"{_name} {self._training_state.name[:6]} {first[:24]}")
            return result

        setattr(FSDPParamGroup, name, marked)


def child(argv: list[str], groups: bool) -> int:
    """One training process with its marks."""
    mark("start")
    import accelerate.accelerator
    import accelerate.utils.fsdp_utils

    from petune.cli import main
    from petune.train import checkpoint, engines, loop, report, strategy

    mark("imports")
    for owner, name in [(strategy, "make_accelerator"), (loop, "load_base"), (loop, "trainable_model")]:
        wrap(owner, name)
    for owner, name in [(loop, "adamw"), (loop, "train_steps"), (engines.Engine, "step")]:
        wrap(owner, name)
    wrap(accelerate.accelerator.Accelerator, "_prepare_fsdp2", before=True)
    wrap(accelerate.accelerator.Accelerator, "_get_named_parameters")
    wrap(accelerate.accelerator, "fsdp2_prepare_model")
    wrap(accelerate.utils.fsdp_utils, "fsdp2_load_full_state_dict", before=True)
    wrap(engines.Engine, "__init__")
    wrap(engines.Engine, "backward", before=True)  # "before backward": after the forward and the loss
    for owner, name in [(loop, "heldout"), (report, "finish"), (checkpoint, "save_trained_tensors")]:
        wrap(owner, name, before=True)
    if groups:
        trace_groups()
    code = main(argv)
    mark(f"end (deepspeed imported: {'deepspeed' in sys.modules})")
    return code


def main() -> None:
    if sys.argv[1:2] == ["--child"]:  # a training process: the rest is `petune` arguments, for petune to parse
        groups = sys.argv[2:3] == ["--groups"]
        raise SystemExit(child(sys.argv[2 + groups :], groups))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="fsdp")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", help="a model folder (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--output", default="/tmp/petune-engines-trace")
    parser.add_argument("--groups", action="store_true", help="also mark every FSDP2 group's unshard/reshard")
    args = parser.parse_args()
    train = ["train", "--output", args.output, "--overwrite", "true", "--max-steps", str(args.steps)]
    train += ["--model", args.model] if args.model else []
    train += ["--batch-size", str(4 // args.nproc), "--max-length", "128", "--lora.target-modules", "all-linear"]
    train += ["--eval-samples", "0", "--eval-before", "false", "--eval-every", "0", "--save-every", "0"]
    train += ["--strategy", args.strategy]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    group = {"WORLD_SIZE": str(args.nproc), "LOCAL_WORLD_SIZE": str(args.nproc), "MASTER_ADDR": "127.0.0.1"}
    group |= {"MASTER_PORT": str(port), "PETUNE_LAUNCHED": "1", "TOKENIZERS_PARALLELISM": "false"}
    group["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))  # as petune's launcher sets
    command = [sys.executable, __file__, "--child", *(["--groups"] if args.groups else []), *train]
    processes = [
        subprocess.Popen(command, env={**environment("mimalloc"), **group, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(args.nproc)
    ]
    raise SystemExit(max(process.wait() for process in processes))


if __name__ == "__main__":
    main()
