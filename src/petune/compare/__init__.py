"""`petune compare`: several methods trained one after another on the same model, data and budget.

run.py      one `petune train` process per method; its held-out loss and accuracy, memory, time, adapter size
report.py   compare.json, compare.md and compare.png
command.py  the command's options
"""

from __future__ import annotations
