"""ComPEFT and low-bit encodings: the defining properties (kept set, signs, scale, error bounds, exact round trips)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftkit.formats import tensor_codec as codec


def test_varints_round_trip():
    v = np.array([0, 1, 127, 128, 300, 2**20, 5, 2**35])
    assert (codec.varint_decode(codec.varint_encode(v), len(v)) == v).all()
    assert len(codec.varint_encode(np.array([5, 100, 127]))) == 3  # one byte below 128


def test_compeft_keeps_top_k_signs_and_the_l2_optimal_scale():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 50, generator=g)
    rec, data = codec.compeft_encode(t, 0.1)
    out = codec.decode(rec, data)
    k = 80
    assert rec["k"] == k and int((out != 0).sum()) == k
    top = torch.topk(t.abs().reshape(-1), k).indices
    assert set(out.reshape(-1).nonzero().flatten().tolist()) == set(top.tolist())
    kept = t.reshape(-1)[top]
    assert torch.equal(out.reshape(-1)[top].sign(), kept.sign())
    c = kept.abs().mean()
    torch.testing.assert_close(out.reshape(-1)[top].abs(), c.expand(k))
    # c minimises the error among ternary tensors on the same support
    err = (t - out).norm()
    for f in (0.9, 1.1):
        assert err <= (t - out * f).norm()
    # std scale: alpha · std
    rec2, data2 = codec.compeft_encode(t, 0.1, scale="std", alpha=2.0)
    assert codec.decode(rec2, data2).abs().max() == pytest.approx(2.0 * float(t.std()), rel=1e-5)


def test_compeft_offset_for_ia3_vectors():
    t = 1 + torch.tensor([0.0, 0.5, -0.01, -2.0])
    rec, data = codec.compeft_encode(t, 0.5, offset=1.0)
    out = codec.decode(rec, data)
    assert out[0] == 1.0 and out[2] == 1.0 and out[1] > 1 and out[3] < 1


@pytest.mark.parametrize("bits,qmax", [("int8", 127), ("int4", 7)])
def test_lowbit_error_is_within_half_a_step_per_row(bits, qmax):
    g = torch.Generator().manual_seed(1)
    t = torch.randn(9, 33, generator=g)
    rec, data = codec.lowbit_encode(t, bits)
    out = codec.decode(rec, data)
    step = t.abs().amax(dim=1, keepdim=True) / qmax
    assert bool(((out - t).abs() <= step / 2 + 1e-6).all())
    assert len(data) == 4 * 9 + (9 * 33 if bits == "int8" else (9 * 33 + 1) // 2)


def test_raw_round_trip_keeps_dtype():
    for t in (torch.arange(7), torch.randn(3, 2).to(torch.bfloat16), torch.zeros(0, 4)):
        rec, data = codec.raw_encode(t)
        back = codec.decode(rec, data)
        assert back.dtype == t.dtype and torch.equal(back, t)
