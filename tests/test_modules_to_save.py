"""``modules_to_save``: whole modules (a classification head) trained as copies and saved with the adapter.

Against peft 0.21.2 (``task_type="SEQ_CLS"`` adds the head to ``modules_to_save``): files both ways give
the same logits, for LoRA, IA3 and LayerNorm tuning. Engine behaviour: only the copies (and the
adapter) train, the base module stays as it was, two adapters hold two heads, mixed batches, merge,
unmerge, delete, buffers (running statistics), errors, merging refusal, head_lr.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import IA3Config, LNTuningConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

import peftkit
from peftkit.core.saved_modules import SavedModule
from peftkit.core.site import AdapterSite

from .cases import all_cases
from .models import MODELS, tiny_bert

HEAD = {"bert": "classifier", "llama": "score"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_llama_cls(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, num_labels=3, pad_token_id=0)
    model = LlamaForSequenceClassification(cfg).eval()
    ids = torch.randint(1, 96, (4, 9), generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def seq_cls(kind: str, seed: int = 0):
    if kind == "llama":
        return tiny_llama_cls(seed)
    model, inputs, _ = tiny_bert(seed)
    return model, inputs


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def randomize(params, seed: int = 0, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn(p.shape, generator=g) * scale)


PEFT_CONFIGS = {
    "lora": lambda kind: LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4,
                                    target_modules=["query", "value"] if kind == "bert" else ["q_proj", "v_proj"]),
    "ia3": lambda kind: IA3Config(task_type="SEQ_CLS", target_modules=["key", "value"], feedforward_modules=[]),
    "ln_tuning": lambda kind: LNTuningConfig(task_type="SEQ_CLS", target_modules=["LayerNorm"]),
}
OURS = {
    "lora": lambda kind, head: peftkit.LoRA(r=2, alpha=4, modules_to_save=[head],
                                            target_modules=["query", "value"] if kind == "bert" else ["q_proj", "v_proj"]),
    "ia3": lambda kind, head: peftkit.IA3(target_modules=["key", "value"], feedforward_modules=[],
                                          modules_to_save=[head]),
    "ln_tuning": lambda kind, head: peftkit.LayerNormTuning(target_modules=["LayerNorm"], modules_to_save=[head]),
}
CASES = [("lora", "bert"), ("lora", "llama"), ("ia3", "bert"), ("ln_tuning", "bert")]


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_peft_seq_cls_file_loads_with_the_same_logits(method, kind, tmp_path):
    model, inputs = seq_cls(kind)
    pm = get_peft_model(model, PEFT_CONFIGS[method](kind))
    randomize([p for p in pm.parameters() if p.requires_grad])  # the adapter and the head's copy
    want = logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    fresh, _ = seq_cls(kind)
    base = logits(fresh, inputs)
    peftkit.load(fresh, tmp_path)
    mods = peftkit.get_adapter(fresh, "default")
    assert isinstance(mods[HEAD[kind]], SavedModule)
    assert mods[HEAD[kind]].config.modules_to_save == [HEAD[kind]]  # "score"/"classifier" kept only where present
    got = logits(fresh, inputs)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base, atol=1e-3)


@pytest.mark.parametrize(("method", "kind"), CASES)
def test_hf_export_loads_in_peft_with_the_same_logits(method, kind, tmp_path):
    model, inputs = seq_cls(kind)
    peftkit.attach(model, OURS[method](kind, HEAD[kind]))
    randomize(peftkit.adapter_parameters(model).values(), seed=1)
    want = logits(model, inputs)
    peftkit.save(model, tmp_path, format="hf")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == [HEAD[kind]] and cfg["task_type"] == "SEQ_CLS"  # as peft writes them
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert f"base_model.model.{HEAD[kind]}.weight" in keys  # peft's key for a modules_to_save copy
    base, _ = seq_cls(kind)
    pm = PeftModel.from_pretrained(base, tmp_path).eval()
    assert torch.allclose(logits(pm, inputs), want, atol=1e-5)


def test_prompt_tuning_with_a_head_exports_to_peft(tmp_path):
    """Next to a prompt-learning adapter the copies are keyed ``base_model.<module>.<tensor>``, as peft saves them."""
    model, inputs, _ = tiny_bert()
    peftkit.attach(model, peftkit.PromptTuning(num_virtual_tokens=3, modules_to_save=["classifier"]))
    randomize(peftkit.adapter_parameters(model).values(), seed=2)
    want = logits(model, inputs)
    peftkit.save(model, tmp_path, format="hf")
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter_model.safetensors")) == {
        "prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    base, _, _ = tiny_bert()
    assert torch.allclose(logits(PeftModel.from_pretrained(base, tmp_path).eval(), inputs), want, atol=1e-5)
    fresh, _, _ = tiny_bert()
    peftkit.load(fresh, tmp_path)
    assert torch.allclose(logits(fresh, inputs), want, atol=1e-6)


def test_only_the_copies_train_and_the_base_module_is_unchanged():
    model, inputs, _ = tiny_bert()
    base_out = logits(model, inputs)
    head_w, head_b = model.classifier.weight.detach().clone(), model.classifier.bias.detach().clone()
    peftkit.attach(model, peftkit.LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert torch.equal(logits(model, inputs), base_out)  # the copy starts as the base head, LoRA's B at 0
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(peftkit.adapter_parameters(model))
    assert {n for n in trainable if "classifier" in n} == {"classifier.adapters.default.weight",
                                                          "classifier.adapters.default.bias"}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(**inputs, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    opt.step()
    copy = peftkit.get_adapter(model, "default")["classifier"]
    assert torch.equal(model.classifier.base.weight, head_w) and torch.equal(model.classifier.base.bias, head_b)
    assert not torch.equal(copy.weight, head_w)
    assert model.classifier.base.weight.grad is None


def two_heads():
    model, inputs, _ = tiny_bert()
    for k, name in enumerate(["a", "b"]):
        peftkit.attach(model, peftkit.LoRA(r=2, target_modules=["query"], modules_to_save=["classifier"]), name=name)
        randomize(peftkit.adapter_parameters(model, name).values(), seed=10 + k)
    return model, inputs


def test_two_adapters_hold_independent_heads_and_mixed_batches_use_each():
    model, inputs = two_heads()
    heads = {n: peftkit.get_adapter(model, n)["classifier"] for n in ("a", "b")}
    assert heads["a"].weight is not heads["b"].weight and not torch.equal(heads["a"].weight, heads["b"].weight)
    alone = {}
    for n in ("a", "b"):
        peftkit.activate(model, n)
        alone[n] = logits(model, inputs)
    with peftkit.disabled(model):
        alone[None] = logits(model, inputs)
    rows = ["a", "b", None, "a"]
    with peftkit.mixed_batch(model, rows):
        mixed = logits(model, inputs)
    for i, n in enumerate(rows):
        assert torch.allclose(mixed[i], alone[n][i], atol=1e-6), (i, n)


def test_merge_unmerge_delete():
    model, inputs = two_heads()
    original = model.classifier.base.weight.detach().clone()
    peftkit.activate(model, "a")
    want = logits(model, inputs)
    peftkit.merge(model)
    assert torch.allclose(logits(model, inputs), want, atol=1e-6)
    assert torch.equal(model.classifier.base.weight, peftkit.get_adapter(model, "a")["classifier"].weight)
    peftkit.unmerge(model)
    assert torch.equal(model.classifier.base.weight, original)  # bit for bit
    assert torch.allclose(logits(model, inputs), want, atol=1e-6)
    peftkit.delete(model, "a")
    peftkit.delete(model, "b")
    assert type(model.classifier) is nn.Linear and torch.equal(model.classifier.weight, original)
    assert not any(isinstance(m, (AdapterSite, SavedModule)) for m in model.modules())
    fresh, _, _ = tiny_bert()
    assert torch.equal(logits(model, inputs), logits(fresh, inputs))


def test_unload_with_merge_keeps_the_trained_head():
    model, inputs = two_heads()
    peftkit.activate(model, "b")
    want = logits(model, inputs)
    head = peftkit.get_adapter(model, "b")["classifier"].weight.detach().clone()
    model = peftkit.unload(model, merge=True)
    assert type(model.classifier) is nn.Linear and torch.equal(model.classifier.weight, head)
    assert not any(isinstance(m, (AdapterSite, SavedModule)) for m in model.modules())
    assert torch.allclose(logits(model, inputs), want, atol=1e-5)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dense = nn.Linear(8, 8)
        self.norm = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.norm(self.dense(x))))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(4, 8)
        self.head = Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_nested_head_copies_every_tensor_and_its_running_statistics(tmp_path):
    net = Net()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    # "Linear" selects the head's linears too: those lie inside a saved module and are left to the copy (peft's rule)
    peftkit.attach(net, peftkit.LoRA(r=2, target_modules=["Linear"], modules_to_save=["head"]))
    assert set(peftkit.get_adapter(net, "default")) == {"body", "head"}
    copy = peftkit.get_adapter(net, "default")["head"]
    assert set(copy.state_dict()) == {"dense.weight", "dense.bias", "norm.weight", "norm.bias", "norm.running_mean",
                                      "norm.running_var", "norm.num_batches_tracked", "out.weight", "out.bias"}
    net.train()
    net(x)  # batch statistics: the copy's running averages move, the base's do not
    assert torch.equal(net.head.base.norm.running_mean, torch.zeros(8))
    assert not torch.equal(copy.norm.running_mean, torch.zeros(8)) and int(copy.norm.num_batches_tracked) == 1
    randomize(peftkit.adapter_parameters(net).values(), seed=3)
    net.eval()
    want = net(x).detach()
    peftkit.save(net, tmp_path)
    fresh = Net().eval()
    peftkit.load(fresh, tmp_path)
    assert torch.equal(fresh(x), want)
    assert torch.equal(peftkit.get_adapter(fresh, "default")["head"].norm.running_mean, copy.norm.running_mean)


def test_bad_names_are_refused_before_the_model_is_touched():
    model, _, _ = tiny_bert()
    with pytest.raises(peftkit.ConfigError, match=r"'clasifier' matches no module.*closest module names: classifier"):
        peftkit.attach(model, peftkit.LoRA(target_modules=["query"], modules_to_save=["clasifier"]))
    with pytest.raises(peftkit.TargetError, match=r"classifier is both a target of lora and in modules_to_save"):
        peftkit.attach(model, peftkit.LoRA(target_modules=["query", "classifier"], modules_to_save=["classifier"]))
    with pytest.raises(peftkit.ConfigError, match="modules_to_save must be a list"):
        peftkit.attach(model, peftkit.LoRA(target_modules=["query"], modules_to_save="classifier"))
    with pytest.raises(peftkit.ConfigError, match="lists 'classifier' twice"):
        peftkit.attach(model, peftkit.LoRA(target_modules=["query"], modules_to_save=["classifier", "classifier"]))
    assert not any(isinstance(m, AdapterSite) for m in model.modules())
    with pytest.raises(peftkit.ConfigError, match=r"selects both 'head' and 'head.out'"):
        peftkit.attach(Net(), peftkit.LoRA(target_modules=["body"], modules_to_save=["head", "out"]))


def test_merging_adapters_with_heads_is_refused_or_drops_them():
    from peftkit.core.adapter_state import extract
    from peftkit.core.saved_modules import split_saved
    from peftkit.merging.adapters import merge_states

    model, inputs = two_heads()
    states = [extract(model, "a"), extract(model, "b")]
    with pytest.raises(peftkit.ConfigError, match=r"modules_to_save: classifier.*cannot be averaged.*'drop'"):
        merge_states(states)
    with pytest.raises(peftkit.ConfigError, match="did you mean 'drop'"):
        merge_states(states, saved_modules="dorp")
    merged = merge_states(states, saved_modules="drop")
    assert merged.config.modules_to_save is None and not any(k.startswith("classifier") for k in merged.tensors)
    plain, head = split_saved(states[0])
    assert set(head) == {"classifier.weight", "classifier.bias"} and "classifier" not in plain.targets
    # task a = the merged adapter with a's head put back as the model's own weights
    fresh, _, _ = tiny_bert()
    fresh.load_state_dict(head, strict=False)
    peftkit.install(fresh, plain)
    peftkit.activate(model, "a")
    assert torch.allclose(logits(fresh, inputs), logits(model, inputs), atol=1e-6)


def test_head_lr_applies_to_the_copies(tmp_path):
    """Adam's first step moves every parameter by its group's lr: the head's copy by head_lr, the adapter by lr."""
    from peftkit.train import train

    from .test_train import cfg, cls_examples, collate

    model, _, _ = tiny_bert(0)
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    with torch.no_grad():  # every LoRA parameter gets a gradient from step 1
        for name, p in peftkit.adapter_parameters(model).items():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    before = {k: v.detach().clone() for k, v in peftkit.adapter_parameters(model).items()}
    base_head = model.classifier.base.weight.detach().clone()
    train(model, cfg(tmp_path, max_steps=1, lr=1e-4, head_lr=1e-2, max_grad_norm=None), cls_examples(), collate=collate)
    steps = {k: float((v.detach() - before[k]).abs().max()) for k, v in peftkit.adapter_parameters(model).items()}
    assert steps["classifier.adapters.default.weight"] == pytest.approx(1e-2, rel=1e-2)
    assert max(v for k, v in steps.items() if "classifier" not in k) == pytest.approx(1e-4, rel=1e-2)
    assert torch.equal(model.classifier.base.weight, base_head)
    saved = json.loads((tmp_path / "run" / "adapter" / "peftkit_adapter.json").read_text())
    assert "classifier.weight" in saved["tensors"] and saved["config"]["modules_to_save"] == ["classifier"]
    assert not (tmp_path / "run" / "adapter" / "extra.safetensors").exists()
    with pytest.raises(peftkit.ConfigError, match="'classifier' is in an adapter's modules_to_save"):
        train(model, cfg(tmp_path, "twice"), cls_examples(), collate=collate, trainable_extra=["classifier"])


def test_training_hooks_see_the_method_modules_only():
    """AdaLoRA's rank allocator walks its own layers; the head's copy is not handed to it."""
    model, inputs, _ = tiny_bert()
    peftkit.attach(model, peftkit.AdaLoRA(init_r=4, target_r=2, target_modules=["query"], total_step=10,
                                          tinit=0, tfinal=0, modules_to_save=["classifier"]))
    model(**inputs, labels=torch.tensor([0, 1, 2, 1])).loss.backward()
    for step in range(3):
        peftkit.after_step(model, step, 10)  # would fail on the copy (it has no lora_E)
    assert (peftkit.regularization_loss(model) > 0).item()


def test_cli_classification_puts_the_head_in_the_adapter(bert_dir, tmp_path, monkeypatch, capsys):
    """``peftkit train --task classification``: no side file; ``peftkit.load`` on a base with another random head
    predicts as the trained model; the HF export loads in peft with the same logits."""
    import peftkit.train as train_module
    from peftkit import tasks
    from peftkit.cli.main import main

    from .tiny_tokenizers import WORDS, bert_tok

    data = tmp_path / "train.tsv"
    data.write_text("text\tlabel\n" + "".join(f"{w} good movie\tpos\n{w} bad movie\tneg\n" for w in WORDS[:6]))
    trained = {}
    run = train_module.train

    def spy(model, *args, **kwargs):
        trained["model"] = model
        return run(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "train", spy)
    out = tmp_path / "run"
    assert main(["train", "--model", str(bert_dir), "--task", "classification", "--method", "lora", "--r", "2",
                 "--target-modules", "query,value", "--data", str(data), "--output", str(out), "--max-steps", "3",
                 "--batch-size", "4", "--head-lr", "0.05"]) == 0
    adapter = out / "adapter"
    assert not (adapter / "extra.safetensors").exists()
    assert json.loads((adapter / "peftkit_adapter.json").read_text())["config"]["modules_to_save"] == ["classifier"]
    enc = bert_tok()(["hello good movie", "bad movie a b"], padding=True, return_tensors="pt")
    want = logits(trained["model"].eval(), enc)
    fresh, _ = tasks.load_model(str(bert_dir), "classification", num_labels=2, seed=123)  # another random head
    assert not torch.allclose(logits(fresh, enc), want, atol=1e-3)
    peftkit.load(fresh, adapter)
    assert torch.allclose(logits(fresh, enc), want, atol=1e-6)
    capsys.readouterr()
    assert main(["info", str(adapter)]) == 0
    assert "modules_to_save=['classifier']" in capsys.readouterr().out
    assert main(["export", str(adapter), "--format", "hf", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "hf")]) == 0
    assert "modules_to_save=['classifier']" in capsys.readouterr().out
    base, _ = tasks.load_model(str(bert_dir), "classification", num_labels=2, seed=7)
    pm = PeftModel.from_pretrained(base, tmp_path / "hf").eval()
    assert torch.allclose(logits(pm, enc), want, atol=1e-5)


CONTRACT = all_cases()
MODEL_HEAD = {"llama": "lm_head", "bert": "classifier", "gpt2": "lm_head", "cnn": "head"}


@pytest.mark.parametrize("case", CONTRACT, ids=[c.id for c in CONTRACT])
def test_every_method_carries_a_saved_module(case, tmp_path):
    """For every registered method: the head's copy trains, saves and loads in both formats, mixes, merges."""
    head = MODEL_HEAD[case.model]
    model, inputs, out = MODELS[case.model](0)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    peftkit.attach(model, case.config().replace(modules_to_save=[head]))
    mods = peftkit.get_adapter(model, "default")
    assert isinstance(mods[head], SavedModule) and len(mods) > 1
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in peftkit.adapter_parameters(model).values()}
    assert {id(p) for p in mods[head].parameters()} <= trainable
    randomize([p for p in peftkit.adapter_parameters(model).values() if p.is_floating_point()], scale=0.1)
    with torch.no_grad():
        y = out(model(**inputs)).float()
        with peftkit.disabled(model):
            y0 = out(model(**inputs)).float()
    tol = max(case.tol, 1e-5) * float(y.abs().max())
    for fmt in ["peftkit", "hf"] if case.hf else ["peftkit"]:
        peftkit.save(model, tmp_path / fmt, format=fmt)
        fresh, _, _ = MODELS[case.model](0)
        peftkit.load(fresh, tmp_path / fmt)
        assert isinstance(peftkit.get_adapter(fresh, "default")[head], SavedModule)
        with torch.no_grad():
            assert (out(fresh(**inputs)).float() - y).abs().max() <= tol, fmt
    if case.mixed:
        rows = ["default", None, "default", None]
        with peftkit.mixed_batch(model, rows), torch.no_grad():
            ym = out(model(**inputs)).float()
        for i, ref in enumerate([y, y0, y, y0]):
            assert (ym[i] - ref[i]).abs().max() <= tol, i
    if case.mergeable and mods[head].mergeable:
        peftkit.merge(model)
        with torch.no_grad():
            assert (out(model(**inputs)).float() - y).abs().max() <= 10 * tol
        peftkit.unmerge(model)
    elif case.mergeable:  # a head tied to the input embedding (GPT-2): refused by name
        with pytest.raises(peftkit.NotMergeableError, match=f"{head}.weight is tied to"):
            peftkit.merge(model)
    peftkit.delete(model, "default")
    after = model.state_dict()
    assert all(torch.allclose(after[k].float(), v.float(), atol=1e-5) for k, v in base.items())


def test_cli_option_takes_a_comma_list():
    from peftkit.cli.options import build_config

    config = build_config("ia3", {"target_modules": "key", "modules_to_save": "classifier,pooler"})
    assert config.modules_to_save == ["classifier", "pooler"]
    with pytest.raises(peftkit.ConfigError, match="did you mean --modules-to-save"):
        build_config("lora", {"modules_to_sav": "classifier"})


def test_compression_keeps_the_copies_exact(tmp_path):
    """ComPEFT sparsifies task vectors; a head's copy is trained values, not a change, so it is stored as it is."""
    from peftkit.compress.api import compress

    model, _ = two_heads()
    peftkit.save(model, tmp_path / "a", name="a")
    state = compress(tmp_path / "a", tmp_path / "c", method="compeft", density=0.05)
    head = peftkit.get_adapter(model, "a")["classifier"]
    assert torch.equal(state.tensors["classifier.weight"], head.weight.detach())
    lora_b = peftkit.get_adapter(model, "a")["bert.encoder.layer.0.attention.self.query"].lora_B.detach()
    assert not torch.equal(state.tensors["bert.encoder.layer.0.attention.self.query.lora_B"], lora_b)


def test_merge_file_drops_heads_when_asked(tmp_path):
    from peftkit.merging.api import run_spec
    from peftkit.merging.config import load_spec

    model, _ = two_heads()
    for n in ("a", "b"):
        peftkit.save(model, tmp_path / n, name=n)
    spec = tmp_path / "merge.yaml"
    spec.write_text(f"inputs: [{tmp_path / 'a'}, {tmp_path / 'b'}]\nmethod: task_arithmetic\noutput: {tmp_path / 'm'}\n")
    with pytest.raises(peftkit.ConfigError, match="saved_modules='drop'"):
        run_spec(spec)
    spec.write_text(spec.read_text() + "saved_modules: dorp\n")
    with pytest.raises(peftkit.ConfigError, match="did you mean 'drop'"):
        load_spec(spec)
    spec.write_text(spec.read_text().replace("dorp", "drop"))
    run_spec(spec, progress=False)
    (state,) = peftkit.read_adapters(tmp_path / "m")
    assert state.config.modules_to_save is None and "classifier" not in state.targets


def test_copies_and_other_adapters_do_not_nest():
    net = Net()
    peftkit.attach(net, peftkit.LoRA(r=2, target_modules=["body"], modules_to_save=["head"]), name="a")
    with pytest.raises(peftkit.TargetError, match=r"head.dense lies inside head, which adapter 'a' trains whole"):
        peftkit.attach(net, peftkit.LoRA(r=2, target_modules=["dense"]), name="b")
    peftkit.attach(net, peftkit.LoRA(r=2, target_modules=["body"], modules_to_save=["head"]), name="b")  # side by side
    other = Net()
    peftkit.attach(other, peftkit.LoRA(r=2, target_modules=["head.dense"]), name="a")
    with pytest.raises(peftkit.TargetError, match=r"head holds adapted modules \(head.dense\) of another adapter"):
        peftkit.attach(other, peftkit.LoRA(r=2, target_modules=["body"], modules_to_save=["head"]), name="b")
    assert peftkit.adapter_names(other) == ["a"]


def test_names_match_as_suffixes_like_peft_distilbert_pre_classifier(tmp_path):
    """peft selects a module whose name *ends with* an entry: ``classifier`` also takes DistilBERT's freshly
    initialised ``pre_classifier``; so does peftkit, and the file round-trips with both."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    def build():
        torch.manual_seed(0)
        cfg = DistilBertConfig(vocab_size=96, dim=32, hidden_dim=64, n_layers=2, n_heads=4, max_position_embeddings=64,
                               num_labels=3)
        return DistilBertForSequenceClassification(cfg).eval()

    ids = torch.randint(0, 96, (3, 7), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    pm = get_peft_model(build(), LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_lin", "v_lin"]))
    randomize([p for p in pm.parameters() if p.requires_grad])
    want = logits(pm, inputs)
    pm.save_pretrained(tmp_path)
    fresh = build()
    peftkit.load(fresh, tmp_path)
    assert {p for p, m in peftkit.get_adapter(fresh, "default").items() if isinstance(m, SavedModule)} == {
        "pre_classifier", "classifier"}
    assert torch.allclose(logits(fresh, inputs), want, atol=1e-5)
    ours = build()
    peftkit.attach(ours, peftkit.LoRA(r=2, target_modules=["q_lin"], modules_to_save=["classifier"]))
    assert {p for p, m in peftkit.get_adapter(ours, "default").items() if isinstance(m, SavedModule)} == {
        "pre_classifier", "classifier"}


def test_hf_target_modules_are_leaf_names_beside_a_nested_head(tmp_path):
    """Linear layers named like the head's own (``head.dense``) do not force a regular expression: peft never
    targets modules inside a saved one."""
    net = Net()
    net.dense = nn.Linear(4, 4)  # a target whose leaf name the head's submodule shares
    peftkit.attach(net, peftkit.LoRA(r=2, target_modules=["body", "dense"], modules_to_save=["head"]))
    assert set(peftkit.get_adapter(net, "default")) == {"body", "dense", "head"}
    peftkit.save(net, tmp_path, format="hf")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["body", "dense"] and cfg["modules_to_save"] == ["head"]


def test_serve_labels_from_task_records_must_agree(tmp_path):
    from peftkit.serve.server import adapter_labels
    from peftkit.tasks import write_task

    dirs = []
    for name, labels in [("a", ["neg", "pos"]), ("b", ["neg", "pos"]), ("c", None), ("d", ["x", "y"])]:
        (tmp_path / name).mkdir()
        if labels is not None:
            write_task(tmp_path / name, {"task": "classification", "model": "m", "labels": labels})
        dirs.append((name, tmp_path / name))
    assert adapter_labels(dirs[:3]) == ["neg", "pos"]
    assert adapter_labels(dirs[2:3]) is None
    with pytest.raises(peftkit.ConfigError, match=r"'d' was trained on labels \['x', 'y'\] but 'a' on \['neg', 'pos'\]"):
        adapter_labels(dirs)


def test_split_saved_keeps_a_file_configs_state(tmp_path):
    """A CorDA adapter read from a file needs no covariances (its factors are in the file); without its head it
    still installs."""
    from peftkit.core.saved_modules import split_saved

    case = next(c for c in CONTRACT if c.id.startswith("corda") and c.model == "llama")
    model, _, _ = MODELS["llama"](0)
    peftkit.attach(model, case.config().replace(modules_to_save=["lm_head"]))
    peftkit.save(model, tmp_path)
    plain, head = split_saved(peftkit.read_adapters(tmp_path)[0])
    assert list(head) == ["lm_head.weight"] and plain.config.modules_to_save is None
    fresh, _, _ = MODELS["llama"](0)
    peftkit.install(fresh, plain)
    assert "lm_head" not in peftkit.get_adapter(fresh, "default")
