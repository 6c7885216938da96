"""bf16 CPU kernels in C (`native.c`): RMSNorm's and SwiGLU's forward and backward passes and the loss's
softmax, one pass each over the data, built on first use with the machine's C compiler and called through ctypes.

Run op by op, RMSNorm's forward is five elementwise operations and a row mean with three fp32 temporaries the
size of its input, its input gradient a dozen operations and a row mean, SwiGLU's half a dozen,
the loss's softmax over each chunk's (rows x vocab) logits five (max, subtract, exp, sum, divide) plus two
conversions between bf16 and fp32: each reads and writes the whole tensor. In C each becomes one loop over a row
that stays in the core's cache, in fp32, rounded to bf16 once, and the loss no longer needs its fp32 (rows x
vocab) buffer (48 MiB for SmolLM2). (torch.compile fused the first two as fast, but importing and running the
compiler cost 43-104 MB of resident memory on SmolLM2's step; this library is 26 kB. BENCHMARKS.md.)

The C file is compiled once per machine and source (`cc -O3 -march=native -ffast-math -fopenmp`, under a second)
into `~/.cache/petune/kernels/` (`$PETUNE_CACHE/kernels`), written under a temporary name and renamed, so processes
starting together do not see half a file. Rows are split between `torch.get_num_threads()` OpenMP threads: the
library needs `libgomp.so.1`, which in a process with torch loaded is torch's own, so its waiting workers do the
work. Where there is no compiler, or it fails, a warning says so once and the op-by-op code runs; `PETUNE_NATIVE=0`
asks for that code outright. Results equal the op-by-op ones to bf16 rounding (tests/kernels/test_native.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC")
X86_FLAGS = ("-mprefer-vector-width=512",)  # gcc's default of 256 bits ran these loops 1.7x slower on AVX-512
SWITCH = "PETUNE_NATIVE"

_failed: list[str] = []  # why the library could not be built or loaded, once that happened


def enabled() -> bool:
    """Whether the C kernels may run: `PETUNE_NATIVE` is not 0 and building them has not failed."""
    off = os.environ.get(SWITCH, "1").strip().lower() in ("0", "false", "no", "off")
    return not off and not _failed


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels can take these tensors: contiguous bf16 on a CPU, and the library builds."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)
        and enabled()
        and library() is not None
    )


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built if this machine has none yet; None (and a warning, once) where that fails."""
    try:
        return _load(_build())
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:
        _failed.append(f"{type(error).__name__}: {error}".splitlines()[0])
        warnings.warn(
            f"petune: building the C kernels failed ({_failed[0]}); running their operations one by one "
            f"(set {SWITCH}=0 to skip building)",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _build() -> Path:
    from petune.embedded import cache_dir

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    flags = FLAGS + (X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else ())
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), compiler.encode(), _cpu().encode()]))
    target = cache_dir() / "kernels" / f"native-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run(
            [compiler, *flags, "-o", str(built), str(SOURCE), "-lm"], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
        os.replace(built, target)
    return target


def _cpu() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags (a cache shared between machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return platform.machine() + "".join(sorted({line for line in lines if line.startswith(wanted)}))


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    pointer, size, count = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.petune_rms_norm_forward.argtypes = [pointer, pointer, ctypes.c_float, pointer, pointer, size, size, count]
    lib.petune_rms_norm_backward.argtypes = [pointer] * 5 + [size, size, count]
    lib.petune_swiglu_forward.argtypes = [pointer] * 3 + [size, count]
    lib.petune_swiglu_backward.argtypes = [pointer] * 5 + [size, count]
    lib.petune_cross_entropy.argtypes = [pointer] * 3 + [size, size, count]
    for name in ("rms_norm_forward", "rms_norm_backward", "swiglu_forward", "swiglu_backward", "cross_entropy"):
        getattr(lib, f"petune_{name}").restype = ctypes.c_int
    return lib


def _call(name: str, *args: object) -> None:
    """Run the library's function `name` on `args` and torch's thread count; callers checked `applies`."""
    lib = library()
    assert lib is not None
    if getattr(lib, name)(*args, torch.get_num_threads()) != 0:
        raise MemoryError(f"petune's C kernel {name} could not allocate its scratch memory")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`weight * bf16(x * rstd)`, fp32 rstd (..., 1)) for bf16 x (..., H) and weight (H), as rms_norm.py's forward."""
    y = torch.empty_like(x)
    width = x.shape[-1]
    rstd = torch.empty(*x.shape[:-1], 1, dtype=torch.float32)
    _call(
        "petune_rms_norm_forward",
        x.data_ptr(),
        weight.contiguous().data_ptr(),
        ctypes.c_float(eps),
        y.data_ptr(),
        rstd.data_ptr(),
        x.numel() // max(width, 1),
        width,
    )
    return y, rstd


def rms_norm_input_gradient(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> torch.Tensor:
    """d loss / d x of `weight * bf16(x * rstd)` (rms_norm.py) for bf16 x (..., H), weight (H), fp32 rstd (..., 1)."""
    grad_y, rstd = grad_y.contiguous(), rstd.float().contiguous()
    grad_x = torch.empty_like(x)
    width = x.shape[-1]
    _call(
        "petune_rms_norm_backward",
        grad_y.data_ptr(),
        x.data_ptr(),
        weight.contiguous().data_ptr(),
        rstd.data_ptr(),
        grad_x.data_ptr(),
        x.numel() // max(width, 1),
        width,
    )
    return grad_x


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` for bf16 gate and up of one shape, rounded as torch rounds its two operations."""
    out = torch.empty_like(gate)
    _call("petune_swiglu_forward", gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel())
    return out


def swiglu_gradients(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d loss / d gate, d loss / d up) of `silu(gate) * up`, all bf16 of one shape."""
    grad = grad.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    _call(
        "petune_swiglu_backward",
        grad.data_ptr(),
        gate.data_ptr(),
        up.data_ptr(),
        grad_gate.data_ptr(),
        grad_up.data_ptr(),
        gate.numel(),
    )
    return grad_gate, grad_up


def cross_entropy_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's cross-entropy (fp32, (rows,)) of bf16 `logits` (rows, vocab) against int64 `targets` (rows,);
    `logits` is overwritten by its gradient, softmax - onehot(target), in bf16."""
    if targets.numel() and not bool(((targets >= 0) & (targets < logits.shape[1])).all()):
        raise IndexError(f"a target is outside the vocabulary of {logits.shape[1]} words")
    targets = targets.to(torch.int64).contiguous()
    losses = torch.empty(logits.shape[0], dtype=torch.float32)
    _call(
        "petune_cross_entropy",
        logits.data_ptr(),
        targets.data_ptr(),
        losses.data_ptr(),
        logits.shape[0],
        logits.shape[1],
    )
    return losses
