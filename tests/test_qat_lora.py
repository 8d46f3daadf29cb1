"""L4Q and LR-QAT: the defining properties (peft has neither method).

* at init (B = 0) the layer computes the round-to-nearest fake-quantized base, not the base;
* after training, the weights lie exactly on the grid and the integer export reproduces the
  training forward (eval mode) bit for bit, with no adapter module left;
* the STE gradients of A and B and LSQ's step-size gradient equal the hand formulas;
* LR-QAT's Φ0 is stored as int8 (fixed point or integers) or as bf16 bits;
* bad options are refused with the culprit named.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import peftkit
from peftkit.core.adapter import AdapterModule
from peftkit.core.errors import AdapterLoadError, AdapterNotFoundError, ConfigError, PeftkitError, TargetError
from peftkit.core.site import AdapterSite
from peftkit.methods.qat_lora import L4Q, LRQAT, QATLayer
from peftkit.quant import QuantizedLinear, export_quantized, load_quantized, save_quantized

from .models import tiny_llama

METHODS = [L4Q, LRQAT]


class Tiny(nn.Module):
    def __init__(self, inp: int = 8, out: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = nn.Linear(inp, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def layer_of(model: nn.Module, name: str = "default") -> QATLayer:
    return next(iter(peftkit.get_adapter(model, name).values()))


def rtn(w: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest by hand: per group absmax / qmax step sizes, the fake-quantized weight."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    wg = w.reshape(w.shape[0], -1, group)
    s = wg.abs().amax(-1, keepdim=True) / qmax
    return (s * torch.clamp(torch.round(wg / s), qmin, qmax)).reshape(w.shape), s.squeeze(-1)


def train_steps(model, inputs, out, steps: int = 5, lr: float = 1e-2) -> None:
    opt = torch.optim.Adam(peftkit.adapter_parameters(model).values(), lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        out(model(**inputs)).float().pow(2).mean().backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("bits,group", [(4, 0), (3, 16), (2, 32), (8, 0)])
def test_l4q_init_is_round_to_nearest_base(bits, group):
    model, _, _ = tiny_llama()
    w = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    peftkit.attach(model, L4Q(r=4, bits=bits, group_size=group, target_modules=["up_proj"]))
    layer = layer_of(model)
    expect, s = rtn(w, bits, group or w.shape[1])
    site = model.model.layers[0].mlp.up_proj
    assert torch.equal(layer.scale.detach(), s)
    assert torch.equal(layer.quantized_weight(site.base), expect)
    x = torch.randn(2, 5, w.shape[1])
    torch.testing.assert_close(site(x), nn.functional.linear(x, expect, site.base.bias), rtol=0, atol=0)
    assert not torch.equal(expect, w)  # quantization changes the layer: identity at init is not the property


def test_lrqat_init_is_fake_quantized_phi():
    model, _, _ = tiny_llama()
    w = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    peftkit.attach(model, LRQAT(r=4, bits=4, target_modules=["q_proj"]))
    layer = layer_of(model)
    _, s = rtn(w, 4, w.shape[1])
    phi = torch.round(w / s * 16) / 16  # int8 fixed point with 8 − 4 = 4 fraction bits (s: one per row)
    expect = s * torch.clamp(torch.round(phi), -8, 7)
    assert torch.equal(layer.quantized_weight(model.model.layers[0].self_attn.q_proj.base), expect)
    assert layer.phi0.dtype == torch.int8 and layer.frac_bits == 4


@pytest.mark.parametrize("method", METHODS)
def test_trained_weights_on_grid_and_export_reproduces_forward(method):
    model, inputs, out = tiny_llama()
    peftkit.attach(model, method(r=4, alpha=8, bits=4, group_size=16, target_modules="all-linear"))
    train_steps(model, inputs, out)
    y_train = out(model(**inputs)).detach()
    layers = {p: (site.base, site.adapters["default"]) for p, site in
              ((n, m) for n, m in model.named_modules() if isinstance(m, AdapterSite))}
    moved = 0
    for _path, (base, layer) in layers.items():
        q = layer.integers(base)
        assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
        w = layer.quantized_weight(base).detach()
        s = layer.scale.detach().repeat_interleave(16, dim=1)
        assert torch.equal(w, s * q.float())  # every weight is exactly s · integer
        moved += int((layer.lora_B != 0).any())
    assert moved == len(layers)
    export_quantized(model)
    assert not any(isinstance(m, (AdapterSite, AdapterModule)) for m in model.modules())
    exported = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(exported) == len(layers) == 14
    for m in exported:
        assert not list(m.children()) and not list(m.parameters())  # no adapter branch, nothing trainable
        assert m.qweight.dtype == torch.int8 and m.scale.dtype == torch.float32
    assert torch.equal(out(model(**inputs)).detach(), y_train)


@pytest.mark.parametrize("method", METHODS)
def test_merge_and_unload_write_the_grid_weights(method):
    model, inputs, out = tiny_llama()
    peftkit.attach(model, method(r=4, bits=3, target_modules=["q_proj", "up_proj"]))
    train_steps(model, inputs, out, steps=3)
    y = out(model(**inputs)).detach()
    grids = {n: m.adapters["default"].quantized_weight(m.base).detach().clone()
             for n, m in model.named_modules() if isinstance(m, AdapterSite)}
    peftkit.unload(model, merge=True)
    assert not any(isinstance(m, AdapterSite) for m in model.modules())
    for n, w in grids.items():
        assert type(model.get_submodule(n)) is nn.Linear
        assert torch.equal(model.get_submodule(n).weight, w)
    assert torch.equal(out(model(**inputs)).detach(), y)


def test_l4q_ste_gradient_matches_hand_formula():
    model = Tiny()
    peftkit.attach(model, L4Q(r=2, alpha=4, bits=3, lsq_grad_scale=False, target_modules=["fc"]))
    layer, base = layer_of(model), model.fc.base
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(3, 2, generator=g) * 0.05)
    x = torch.randn(5, 8, generator=g)
    gy = torch.randn(5, 3, generator=g)
    (model(x) * gy).sum().backward()
    A, B, s, c = layer.lora_A.detach(), layer.lora_B.detach(), layer.scale.detach(), layer.scaling
    w1 = base.weight.detach() + c * B @ A
    u = w1 / s
    inside = (u > -4) & (u < 3)
    assert 0 < int(inside.sum()) < u.numel() or bool(inside.all())
    gw = gy.t() @ x  # ∂L/∂Ŵ
    gw1 = gw * inside  # STE: ∂Ŵ/∂W' = s · 1[inside] · (1/s)
    torch.testing.assert_close(layer.lora_B.grad, c * gw1 @ A.t())
    torch.testing.assert_close(layer.lora_A.grad, c * B.t() @ gw1)
    q = torch.clamp(torch.round(u), -4, 3)
    lsq = torch.where(inside, q - u, q)  # LSQ: round(v/s) − v/s inside, the clipped level outside
    torch.testing.assert_close(layer.scale.grad, (gw * lsq).sum(1, keepdim=True))


def test_lsq_step_gradient_hand_example():
    """One row of 4 weights, 3 bits (levels −4..3), s = 0.2, B = 0, ∂L/∂Ŵ = [1, 2, 3, 4]:

    v/s = [1.3, −4.5, 0.25, 3.5] → LSQ terms [round(1.3) − 1.3, −4 (clipped), round(0.25) − 0.25, 3 (clipped)]
    = [−0.3, −4, −0.25, 3]; ∂L/∂s = (−0.3 − 8 − 0.75 + 12) · g = 2.95 / √(4 · 3).
    """
    model = Tiny(inp=4, out=1)
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[0.26, -0.9, 0.05, 0.7]]))
    peftkit.attach(model, L4Q(r=1, alpha=1, bits=3, target_modules=["fc"]))
    layer = layer_of(model)
    with torch.no_grad():
        layer.scale.fill_(0.2)
    w = layer.quantized_matrix(model.fc.base)
    assert torch.allclose(w, torch.tensor([[0.2, -0.8, 0.0, 0.6]]))
    (w * torch.tensor([[1.0, 2.0, 3.0, 4.0]])).sum().backward()
    assert layer.scale.grad.item() == pytest.approx(2.95 / math.sqrt(12), rel=1e-5)


def test_lrqat_ste_gradient_matches_hand_formula():
    model = Tiny(inp=8, out=4)
    peftkit.attach(model, LRQAT(r=2, alpha=4, bits=4, group_size=4, lsq_grad_scale=False, target_modules=["fc"]))
    layer = layer_of(model)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(4, 2, generator=g) * 0.3)
    gw = torch.randn(4, 8, generator=g)
    (layer.quantized_matrix(model.fc.base) * gw).sum().backward()
    A, B, c = layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    s = layer.scale.detach().repeat_interleave(4, dim=1)
    u = layer.phi().reshape(4, 8) + c * B @ A
    inside = (u > -8) & (u < 7)
    gu = gw * s * inside  # ∂Ŵ/∂u = s · 1[inside]
    torch.testing.assert_close(layer.lora_B.grad, c * gu @ A.t())
    torch.testing.assert_close(layer.lora_A.grad, c * B.t() @ gu)
    q = torch.clamp(torch.round(u), -8, 7)  # Φ0 does not move with s: ∂Ŵ/∂s = q
    torch.testing.assert_close(layer.scale.grad, (gw * q).reshape(4, 2, 4).sum(-1))


@pytest.mark.parametrize("fmt,dtype", [("fixed", torch.int8), ("int", torch.int8), ("bf16", torch.int16)])
def test_lrqat_phi_storage(fmt, dtype):
    model = Tiny(inp=16, out=4)
    w = model.fc.weight.detach().clone()
    peftkit.attach(model, LRQAT(r=2, bits=4, phi_format=fmt, target_modules=["fc"]))
    layer = layer_of(model)
    assert layer.phi0.dtype == dtype and "phi0" not in layer.state_dict()
    u0 = w / layer.scale.detach()
    err = (layer.phi().reshape(4, 16) - u0).abs().max().item()
    assert err <= {"fixed": 1 / 32, "int": 0.5, "bf16": 8 / 256}[fmt] + 1e-6
    model.to(torch.bfloat16)
    assert layer.phi0.dtype == dtype  # a dtype change of the model leaves Φ0's storage alone


@pytest.mark.parametrize("method", METHODS)
def test_checkpointing_gives_the_same_gradients(method):
    grads = []
    for ckpt in (False, True):
        model, inputs, out = tiny_llama()
        peftkit.attach(model, method(r=4, bits=4, checkpoint=ckpt, target_modules=["q_proj", "down_proj"]))
        with torch.no_grad():
            for n, p in peftkit.adapter_parameters(model).items():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        model.train()
        out(model(**inputs)).pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in peftkit.adapter_parameters(model).items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)


def test_bad_options_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"bits=5 .*2, 3, 4, 8.*closest: 4"):
        L4Q(bits=5).validate()
    with pytest.raises(ConfigError, match="did you mean 'fixed'"):
        LRQAT(phi_format="fixd").validate()
    with pytest.raises(ConfigError, match="scale_init"):
        L4Q(scale_init="minmax").validate()
    model, inputs, out = tiny_llama()
    before = out(model(**inputs)).detach()
    with pytest.raises(TargetError, match=r"up_proj.*group_size 24 does not divide .*32.*closest valid: 16, 32"):
        peftkit.attach(model, L4Q(group_size=24, target_modules=["up_proj"]))
    with pytest.raises(TargetError, match="rank 40"):
        peftkit.attach(model, LRQAT(r=40, target_modules=["q_proj"]))
    assert not any(isinstance(m, AdapterSite) for m in model.modules())
    assert torch.equal(out(model(**inputs)).detach(), before)


def test_stacked_qat_adapters_are_refused():
    model, inputs, _ = tiny_llama()
    peftkit.attach(model, L4Q(target_modules=["q_proj"]), name="a")
    peftkit.attach(model, LRQAT(target_modules=["q_proj"]), name="b")
    peftkit.activate(model, ["a", "b"])
    with pytest.raises(PeftkitError, match=r"lrqat .*cannot run stacked.*active together: a\)"):
        model(**inputs)


def test_export_checks_before_changing_anything():
    model, inputs, out = tiny_llama()
    peftkit.attach(model, L4Q(target_modules=["q_proj"]), name="qat")
    with pytest.raises(AdapterNotFoundError, match="did you mean 'qat'"):
        export_quantized(model, "qta")
    peftkit.attach(model, peftkit.LoRA(target_modules=["q_proj", "v_proj"]), name="lora")
    with pytest.raises(ConfigError, match="q_proj also holds 'lora'"):
        export_quantized(model)
    with pytest.raises(ConfigError, match="'lora' is lora, not l4q or lrqat"):
        export_quantized(model, "lora")
    assert sum(isinstance(m, AdapterSite) for m in model.modules()) == 4
    peftkit.delete(model, "lora")
    peftkit.activate(model, "qat")
    y = out(model(**inputs)).detach()
    export_quantized(model)
    assert torch.equal(out(model(**inputs)).detach(), y)


@pytest.mark.parametrize("method", METHODS)
def test_save_load_keeps_step_sizes_and_recomputes_phi(method, tmp_path):
    model, inputs, out = tiny_llama()
    peftkit.attach(model, method(r=4, bits=4, target_modules="all-linear"))
    train_steps(model, inputs, out, steps=2)
    y = out(model(**inputs)).detach()
    peftkit.save(model, tmp_path / "a")
    fresh, _, _ = tiny_llama()
    peftkit.load(fresh, tmp_path / "a")
    assert torch.equal(out(fresh(**inputs)).detach(), y)


@pytest.mark.parametrize("method", METHODS)
def test_checkpoint_keeps_only_the_layer_input_for_backward(method):
    """The quantized weight is one autograd node that keeps no weight-sized tensor (it recomputes u in
    backward): without checkpointing only the input and Ŵ (for the input's gradient) are kept; with
    ``checkpoint=True`` the input alone, and Ŵ is formed again in backward."""
    saved = {}
    for ckpt in (False, True):
        model = Tiny(64, 48)
        peftkit.attach(model, method(r=4, checkpoint=ckpt, target_modules=["fc"]))
        resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        x = torch.randn(2, 64, requires_grad=True)
        seen: dict[int, int] = {}

        def pack(t, seen=seen, resident=resident):
            if t.untyped_storage().data_ptr() not in resident:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum().backward()
        saved[ckpt] = sum(seen.values())
    assert saved[True] == 2 * 64 * 4  # x only
    assert saved[False] == 2 * 64 * 4 + 48 * 64 * 4  # x and Ŵ: no STE mask, no W0 + c·B A, no integers


def test_save_and_load_the_integer_layers(tmp_path):
    model, inputs, out = tiny_llama()
    peftkit.attach(model, L4Q(r=4, bits=4, group_size=16, target_modules="all-linear"))
    train_steps(model, inputs, out, steps=2)
    export_quantized(model)
    y = out(model(**inputs)).detach()
    save_quantized(model, tmp_path / "int4")
    fresh, _, _ = tiny_llama()
    load_quantized(fresh, tmp_path / "int4")
    assert sum(isinstance(m, QuantizedLinear) for m in fresh.modules()) == 14
    assert torch.equal(out(fresh(**inputs)).detach(), y)
    with pytest.raises(ConfigError, match="no QuantizedLinear"):
        save_quantized(tiny_llama()[0], tmp_path / "none")
    from .models import tiny_gpt2

    gpt2 = tiny_gpt2()[0]
    with pytest.raises(AdapterLoadError, match=r"model\.layers\.0\.self_attn\.q_proj is not in GPT2LMHeadModel"):
        load_quantized(gpt2, tmp_path / "int4")
    assert not any(isinstance(m, QuantizedLinear) for m in gpt2.modules())  # nothing replaced


def test_cli_trains_l4q_and_exports_integers(llama_dir, lm_data, tmp_path, capsys):
    from peftkit.cli.main import main

    train, _ = lm_data
    run = tmp_path / "run"
    assert main(["train", "--model", str(llama_dir), "--task", "causal-lm", "--method", "lrqat", "--r", "4",
                 "--bits", "4", "--group-size", "16", "--target-modules", "q_proj,v_proj", "--data", str(train),
                 "--output", str(run), "--max-steps", "2", "--batch-size", "4"]) == 0
    assert main(["export", str(run / "adapter"), "--format", "int", str(tmp_path / "int4")]) == 0
    assert "integer layers written" in capsys.readouterr().out
    model = load_quantized(AutoModelForCausalLM.from_pretrained(llama_dir), tmp_path / "int4")
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 4


@pytest.mark.parametrize("method", METHODS)
def test_export_of_a_bfloat16_model_reproduces_its_forward(method):
    model, inputs, out = tiny_llama()
    model.to(torch.bfloat16)
    peftkit.attach(model, method(r=4, bits=4, target_modules=["q_proj", "gate_proj"]))
    train_steps(model, inputs, out, steps=2)
    y = out(model(**inputs)).detach()
    export_quantized(model)
    assert torch.equal(out(model(**inputs)).detach(), y)


def test_qat_param_groups_put_step_sizes_apart():
    model, _, _ = tiny_llama()
    peftkit.attach(model, L4Q(r=4, target_modules=["q_proj", "v_proj"]))
    rest, steps = peftkit.qat_param_groups(model, lr=1e-3)
    assert steps["lr"] == pytest.approx(1e-5) and rest["lr"] == 1e-3
    assert len(steps["params"]) == 4 and len(rest["params"]) == 8
    assert all(p.dim() == 2 and p.shape[1] == 1 for p in steps["params"])  # one step size per output channel
    assert peftkit.qat_param_groups(model, lr=1e-3, scale_lr=2e-6)[1]["lr"] == 2e-6
    with pytest.raises(ConfigError, match="no trainable L4Q/LR-QAT step sizes"):
        peftkit.qat_param_groups(tiny_llama()[0], lr=1e-3)
