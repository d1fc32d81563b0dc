"""Where each checkpoint tensor lives at run time and how many bytes it takes there: one home for the rules that
`runtime/planner.py` (what `plan` prints, what `serve --hardware` checks) and a running rank
(`runtime/tensor_parallel.resident_bytes`, what `generate --json` reports) both use.

Placement of an official checkpoint key:
* `routed`: a routed expert (`*.ffn.experts.E.*`), held by its expert-parallel owner only (1/EP of them per card);
* `tp`: sliced over the attention TP group (`model/tp.py`), 1/TP per card;
* `replicated`: whole on every card.

Resident bytes differ from the stored bytes for two tensors, by the model's own choices:
* `head.weight` is kept in fp32 (the head runs in fp32, model-spec §3; `Transformer.head`);
* `attn.wo_a` runs as a dense matrix in the activation dtype (`Attention.post_load`): its FP8 weight expands to
  the activation dtype and its scale is dropped.
"""

from __future__ import annotations

import re

from .tp import is_tp_split

ROUTED, TP, REPLICATED = "routed", "tp", "replicated"
DRAFT_PREFIX = "mtp."  # checkpoint keys of the draft blocks: April MTP blocks or DSpark stages
# A routed expert's tensor; group 1 is its global expert id (the loader skips other ranks' experts by it).
EXPERT_TENSOR = re.compile(r"^(?:layers|mtp)\.\d+\.ffn\.experts\.(\d+)\.")
_WO_A = re.compile(r"^(layers|mtp)\.\d+\.attn\.wo_a\.")


def placement(name: str) -> str:
    """`routed`, `tp` or `replicated` for checkpoint key `name`."""
    if EXPERT_TENSOR.match(name):
        return ROUTED
    return TP if is_tp_split(name) else REPLICATED


def resident_nbytes(name: str, numel: int, stored_nbytes: int, act_bytes: int) -> int:
    """Bytes checkpoint tensor `name` (numel elements, stored_nbytes in the files) takes once loaded, with
    activations of act_bytes bytes (2 for BF16)."""
    if name == "head.weight":
        return numel * 4
    if _WO_A.match(name):
        return numel * act_bytes if name.endswith(".weight") else 0
    return stored_nbytes


__all__ = ["placement", "resident_nbytes", "EXPERT_TENSOR", "ROUTED", "TP", "REPLICATED"]
