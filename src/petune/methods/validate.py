"""Config-field checks shared by the method configs: one message form, naming the field and what it allows."""

from __future__ import annotations

from typing import Any


def _field(config: Any, name: str) -> str:
    return f"{type(config).__name__}.{name}"


def check_module_names(config: Any, name: str) -> list[str] | str | None:
    """A module-name field (`target_modules`, ...): None, a regex string, or a sorted list of names."""
    value = getattr(config, name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list | tuple | set) and all(isinstance(v, str) for v in value):
        return sorted(set(value))
    raise ValueError(f"{_field(config, name)} must be a list of module names or a regex string, got {value!r}")


def check_bool(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{_field(config, name)} must be True or False, got {value!r}")


def check_positive_int(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{_field(config, name)} must be a positive integer, got {value!r}")


def check_number(config: Any, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{_field(config, name)} must be a number, got {value!r}")


def check_probability(config: Any, *names: str) -> None:
    """A dropout rate: a number in [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
            raise ValueError(f"{_field(config, name)} must be in [0, 1), got {value!r}")


def check_layers(config: Any) -> None:
    """`layers_to_transform` (int or list of ints, made a list) and its need for a list `target_modules`."""
    layers = config.layers_to_transform
    if isinstance(layers, int) and not isinstance(layers, bool):
        layers = config.layers_to_transform = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(i, int) for i in layers)):
        raise ValueError(f"{_field(config, 'layers_to_transform')} must be a layer index or a list of them")
    if layers is not None and isinstance(config.target_modules, str):
        raise ValueError(f"{_field(config, 'layers_to_transform')} needs a list target_modules, not a regex")


def check_patterns(config: Any, ranks: str = "rank_pattern", alphas: str = "alpha_pattern") -> None:
    """`rank_pattern` values are positive integers, `alpha_pattern` values numbers."""
    for key, rank in getattr(config, ranks).items():
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"{_field(config, ranks)}[{key!r}] must be a positive integer, got {rank!r}")
    for key, alpha in getattr(config, alphas).items():
        if isinstance(alpha, bool) or not isinstance(alpha, int | float):
            raise ValueError(f"{_field(config, alphas)}[{key!r}] must be a number, got {alpha!r}")


def check_non_negative_int(config: Any, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{_field(config, name)} must be an integer >= 0, got {value!r}")


def check_exactly_one(config: Any, first: str, second: str) -> None:
    """Two sizes of which exactly one is set (non-zero), the other derived from the layer (OFT, BOFT)."""
    a, b = getattr(config, first), getattr(config, second)
    if (a != 0) == (b != 0):
        raise ValueError(
            f"{type(config).__name__}: set exactly one of {first} and {second} (the other is 0 and derived from "
            f"the layer's input size), got {first}={a}, {second}={b}"
        )


def check_no_bias(config: Any) -> None:
    if config.bias != "none":
        name = type(config).__name__
        raise ValueError(f"{name}.bias must be 'none' in petune (it does not train biases), got {config.bias!r}")


def check_layers_pattern(config: Any) -> None:
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError(f"{_field(config, 'layers_pattern')} needs layers_to_transform (the block indices to adapt)")
