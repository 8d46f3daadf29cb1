"""peft parity, driven by the rows of ``tests/parity_cases.py``: files both ways give equal outputs."""

from __future__ import annotations

import pytest
import torch

import peftkit

from .models import MODELS, outputs
from .parity_cases import CASES


def randomise(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_peft_file_loads_in_peftkit_with_equal_outputs(case, tmp_path):
    from peft import get_peft_model

    model, inputs, out = MODELS[case.model](0)
    pm = get_peft_model(model, case.peft()).eval()
    randomise([p for p in pm.parameters() if p.requires_grad])
    ref = outputs(pm, inputs, out)
    pm.save_pretrained(tmp_path)
    base, _, _ = MODELS[case.model](0)
    assert not torch.allclose(outputs(base, inputs, out), ref, atol=1e-4), "the adapter changes nothing"
    peftkit.load(base, tmp_path)
    torch.testing.assert_close(outputs(base, inputs, out), ref, atol=case.atol, rtol=1e-4)


@pytest.mark.parametrize("case", [c for c in CASES if c.ours is not None], ids=[c.id for c in CASES if c.ours])
def test_peftkit_hf_export_loads_in_peft_with_equal_outputs(case, tmp_path):
    from peft import PeftModel

    model, inputs, out = MODELS[case.model](0)
    peftkit.attach(model, case.ours())
    randomise(peftkit.adapter_parameters(model).values())
    ours = outputs(model, inputs, out)
    peftkit.save(model, tmp_path, format="hf")
    base, _, _ = MODELS[case.model](0)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(outputs(pm, inputs, out), ours, atol=case.atol, rtol=1e-4)
