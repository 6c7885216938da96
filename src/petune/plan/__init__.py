"""`petune plan`: will this fine-tuning step fit, and what does it cost? Memory by component, from shapes alone.

architectures.py  the built-in table of popular models (real shapes, sources) and config.json / GGUF readers
setup.py          `Setup`: method, precision, batch, sequence length, checkpointing, adapter options
counts.py         parameter counts (model and adapters) and training FLOPs per token
memory.py         bytes per component and the step's peak (`plan`), the largest batch or sequence that fits
gpus.py           named GPUs and the measured framework overhead per device type
command.py        the `petune plan` command: a table or JSON
measure.py        a measured step on this CPU, to check the predictions (`python -m petune.plan.measure`)
"""

from __future__ import annotations

from petune.plan.architectures import ARCHITECTURES, Architecture, resolve_architecture
from petune.plan.gpus import GPUS, Device, named_device, sized_device, this_cpu
from petune.plan.memory import COMPONENTS, Plan, largest_fitting, plan
from petune.plan.setup import METHODS, PRECISIONS, Setup

__all__ = [
    "ARCHITECTURES",
    "COMPONENTS",
    "GPUS",
    "METHODS",
    "PRECISIONS",
    "Architecture",
    "Device",
    "Plan",
    "Setup",
    "largest_fitting",
    "named_device",
    "plan",
    "resolve_architecture",
    "sized_device",
    "this_cpu",
]
