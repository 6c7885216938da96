"""The classes petune patches still compute exactly what LlamaRMSNorm and LlamaMLP do in the installed
transformers: if a family's forward drifts from Llama's, its entry in `petune.kernels.FAMILIES` must go."""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap

import pytest

from petune.kernels import FAMILIES


def forward_tree(family: str, class_name: str) -> str:
    module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    source = textwrap.dedent(inspect.getsource(getattr(module, class_name).forward))
    tree = ast.parse(source).body[0]
    assert isinstance(tree, ast.FunctionDef)
    tree.decorator_list = []
    return ast.dump(tree)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_classes_compute_what_llamas_do(family: str) -> None:
    norm, mlp = FAMILIES[family]
    assert forward_tree(family, norm) == forward_tree("llama", "LlamaRMSNorm")
    if mlp is not None:
        assert forward_tree(family, mlp) == forward_tree("llama", "LlamaMLP")
