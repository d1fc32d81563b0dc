"""What every tensor format provides, and the safetensors dtype names it is stored with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..st_io import ST_DTYPES, TORCH_DTYPES

# safetensors dtype name <-> torch dtype (model-spec.md §8.1, ascend-notes §6.3): the one table lives in st_io.
ST_DTYPE, TORCH_DTYPE = ST_DTYPES, TORCH_DTYPES


@dataclass(frozen=True)
class TensorLayout:
    """One stored tensor of a linear: shape and torch dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def st_dtype(self) -> str:
        return ST_DTYPE[self.dtype]

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for x in self.shape:
            n *= x
        return n


class TensorFormat:
    """How one linear weight [out, in] is stored. Subclasses document their scale layout.

    Attributes:
        name: registry key (set by `register_format`).
        linear_fmt: the `ascend_v4.model.layers.Linear` fmt that runs it ("fp8", "fp4", "dense", "int8", "int4").
        quant_type: the msModelSlim ascendV1 quant type of its tensors ("FLOAT" when not quantised).
    """

    name: str = ""
    linear_fmt: str = ""
    quant_type: str = "FLOAT"

    def layout(self, out: int, inp: int, down: bool = False) -> dict[str, TensorLayout]:
        """{suffix: layout} of the stored tensors (`<linear>.<suffix>`), weight first.
        `down`: the linear is an MoE down projection (w2); only int4_channel stores something different."""
        raise NotImplementedError

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """Stored tensors (by suffix) -> dense fp32 weight [out, in]."""
        raise NotImplementedError

    def convert(self, src: "TensorFormat", t: dict[str, torch.Tensor], down: bool = False) -> dict[str, torch.Tensor]:
        """Tensors of this format from the tensors `t` of format `src` (deterministic: same input, same bytes)."""
        raise NotImplementedError(f"no conversion from {src.name} to {self.name}")


def out_in(fmt: TensorFormat, t: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Logical (out, in) of a linear from its stored tensors."""
    w = t["weight"]
    if fmt.name == "fp4_mx":
        return w.shape[0], 2 * w.shape[1]
    if fmt.name == "int4_channel":
        return 2 * w.shape[0], w.shape[1]
    return w.shape[0], w.shape[1]
