"""Weight formats and the offline converter (`ascend-v4 quantize`), shipped as `ascend_v4.quant`.

Two phases (code-style.md §2.11):
* offline, `tool.quantize()` streams an official FP8/FP4 checkpoint into another on-disk format
  (`formats/`: scale layout, conversion and dequantisation of one linear's tensors);
* at load time the model swaps its `Linear`s to the stored format (`ascend_v4.model.layers.Linear.set_format`,
  driven by `ascend_v4.checkpoint`), so loading stays a strict copy by name.

The registry maps a tensor-format name (`fp8_block`, `fp4_mx`, `bf16`, `int8_channel`, `int4_channel`) to
the object implementing it; registering a name twice raises `DuplicateFormatError`.
Ledger: the built-in formats (`formats/`, which import torch) register themselves on the first lookup, so
`import ascend_v4.quant.recipes` (the CLI's format list) stays free of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class DuplicateFormatError(KeyError):
    """A tensor format was registered under a name that is already taken."""


class UnknownFormatError(KeyError):
    """No tensor format is registered under the requested name."""


_FORMATS: dict[str, object] = {}


def register_format(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: register one instance of the decorated format class under `name`.

    Raises:
        DuplicateFormatError: `name` is already registered (by this or another class).
    """

    def deco(cls: type[T]) -> type[T]:
        if name in _FORMATS:
            raise DuplicateFormatError(f"tensor format {name!r} is already registered by "
                                       f"{type(_FORMATS[name]).__qualname__}")
        inst = cls()
        setattr(inst, "name", name)
        _FORMATS[name] = inst
        return cls

    return deco


def _load_builtins() -> None:
    from . import formats  # noqa: F401  (registers the built-in formats once)


def get_format(name: str):  # -> formats.base.TensorFormat (not imported here: keeps this module light)
    """The registered format object called `name`."""
    if name not in _FORMATS:
        _load_builtins()
    try:
        return _FORMATS[name]
    except KeyError:
        raise UnknownFormatError(f"unknown tensor format {name!r}; registered: {', '.join(sorted(_FORMATS))}") \
            from None


def format_names() -> list[str]:
    _load_builtins()
    return sorted(_FORMATS)

__all__ = ["register_format", "get_format", "format_names", "DuplicateFormatError", "UnknownFormatError"]
