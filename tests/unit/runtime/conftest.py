"""Shared fixtures of the runtime tests: the tiny dummy model (fp32, simulation off, dense weights) and the real
V4 tokenizer, loaded once per module."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def model():
    from ascend_v4.checkpoint.dummy import ensure_dummy_checkpoint
    from ascend_v4.model.layers import ModelOptions
    from ascend_v4.model.load import load_model

    return load_model(ensure_dummy_checkpoint("tiny"),
                      ModelOptions(dtype=torch.float32, quant_sim=False, dequantize_weights=True))


@pytest.fixture(scope="module")
def tok():
    from ascend_v4.tokenizer import Tokenizer

    return Tokenizer.default()
