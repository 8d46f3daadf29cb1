"""Adapters on a model sharded with FSDP2 (``fully_shard``): train, save, load — 2 CPU processes (gloo).

The workers (this file run as a script) build the tiny Llama, attach LoRA, shard every decoder
layer and the root, train two steps, then ``peftkit.save`` on every rank (rank 0 writes). Rank 0
also writes the logits the sharded model computes. Then every rank loads the saved adapter into
a fresh model *before* sharding it and rank 0 writes those logits too. This process checks the
files against an unsharded model: same adapter as a single-process run of the same steps, same
logits (peftkit and Hugging Face formats).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import peftkit
from tests.models import tiny_llama
from tests.ranks import run_two_ranks

TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]  # lm_head: outside the blocks, in the root's group
STEPS = 2


def lora_model():
    model, inputs, _ = tiny_llama(0)
    peftkit.attach(model, peftkit.LoRA(r=4, alpha=8, target_modules=TARGETS))
    return model, inputs


def train_steps(model, inputs) -> None:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(STEPS):
        model(input_ids=inputs["input_ids"], labels=inputs["input_ids"]).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def worker(out: Path) -> None:
    """One rank: train + save a sharded model; load-then-shard; rank 0 writes what the test compares."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from peftkit.methods import lora_fused

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    fused_calls = [0]
    fused_apply = lora_fused.FusedLoRALinear.apply

    def counting_apply(*args):
        fused_calls[0] += 1
        return fused_apply(*args)

    lora_fused.FusedLoRALinear.apply = counting_apply  # type: ignore[method-assign]
    model, inputs = lora_model()
    shard(model)
    train_steps(model, inputs)
    sharded_logits = logits(model, inputs)
    peftkit.save(model, out / "adapter")
    assert (out / "adapter" / "adapter.safetensors").is_file()  # every rank returns after rank 0 wrote
    peftkit.save(model, out / "hf", format="hf")
    assert (out / "hf" / "adapter_model.safetensors").is_file()
    if rank == 0:
        (out / "blocked").write_text("")  # a file where a directory is needed: rank 0's write fails
    dist.barrier()
    try:
        peftkit.save(model, out / "blocked" / "adapter")
        raise AssertionError("saving under a file did not fail")
    except (OSError, peftkit.PeftkitError) as e:  # rank 0: the OS error; the others: told by rank 0
        assert isinstance(e, OSError) if rank == 0 else "rank 0 failed" in str(e), repr(e)
    errors = []
    for call in (lambda: peftkit.load(model, out / "adapter", name="again"),
                 lambda: peftkit.attach(model, peftkit.LoRA(r=2, target_modules=["k_proj"]), name="more")):
        try:
            call()
        except peftkit.ConfigError as e:
            errors.append(str(e))

    fresh = tiny_llama(0)[0]
    peftkit.load(fresh, out / "adapter", trainable=True)
    shard(fresh)
    loaded_logits = logits(fresh, inputs)
    if rank == 0:
        save_file({"sharded": sharded_logits, "load_then_shard": loaded_logits}, str(out / "logits.safetensors"))
        (out / "report.txt").write_text(f"{fused_calls[0]}\n" + "\n".join(errors))
    dist.barrier()
    dist.destroy_process_group()


def counting_evaluate():
    """An evaluation whose metric ``eval_call_loss`` is lowest at the first call: the best adapter is the first
    evaluated one, so the loop must restore it (into sharded parameters) at the end."""
    from peftkit.train import default_evaluate

    calls = [0]

    def evaluate(model, batches):
        calls[0] += 1
        return {**default_evaluate(model, batches), "call_loss": float(calls[0])}

    return evaluate


def loop_config(out: Path, **kw):
    from peftkit.train import TrainConfig

    base = {"lr": 1e-2, "batch_size": 2, "grad_accum": 2, "max_steps": 3, "eval_every": 2, "log_every": 1,
            "progress": False, "metric": "eval_call_loss"}
    return TrainConfig(output=str(out), **{**base, **kw})


def loop_worker(out: Path) -> None:
    """One rank of ``peftkit.train.train`` with ``fsdp=True`` (the loop initialises the process group)."""
    import torch.distributed as dist

    from peftkit.train import train
    from tests.test_train import collate, llama_lora, lm_examples

    model = llama_lora()
    train(model, loop_config(out, fsdp=True), lm_examples(12), lm_examples(4), collate=collate,
          evaluate=counting_evaluate())
    assert any(type(m).__name__.startswith("FSDP") for m in model.modules())
    dist.destroy_process_group()


def _launch(target: str, out: Path) -> None:
    run_two_ranks(f"from pathlib import Path; from tests.test_fsdp import {target}; {target}(Path({str(out)!r}))")


def _fsdp2_unavailable() -> str | None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with the gloo backend is not available"
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return "this torch has no FSDP2 (torch.distributed.fsdp.fully_shard)"
    return None


def test_fsdp2_train_save_load(tmp_path):
    from safetensors.torch import load_file

    reason = _fsdp2_unavailable()
    if reason:
        pytest.skip(reason)
    out = tmp_path / "fsdp"
    out.mkdir()
    _launch("worker", out)

    fused_calls, *errors = (out / "report.txt").read_text().splitlines()
    assert int(fused_calls) > 0  # the fused LoRA kernel ran on the unsharded weights
    assert len(errors) == 2 and all("before fully_shard" in e for e in errors), errors
    meta = (out / "adapter" / "peftkit_adapter.json").read_text()
    assert '"class": "LlamaForCausalLM"' in meta

    # the gathered adapter is the one a single process gets from the same steps
    single, inputs = lora_model()
    train_steps(single, inputs)
    saved = load_file(out / "adapter" / "adapter.safetensors")
    ours = {k.replace(".adapters.default.", "."): v for k, v in peftkit.adapter_parameters(single).items()}
    assert saved.keys() == ours.keys()
    for k in saved:
        assert torch.allclose(saved[k], ours[k].detach(), atol=1e-5, rtol=0), k

    # the saved files reproduce the sharded model's outputs on an unsharded model
    ref = load_file(out / "logits.safetensors")
    for directory in ("adapter", "hf"):
        plain = tiny_llama(0)[0]
        peftkit.load(plain, out / directory)
        got = logits(plain, inputs)
        assert torch.allclose(got, ref["sharded"], atol=1e-5, rtol=0), (directory, (got - ref["sharded"]).abs().max())
        assert torch.allclose(got, ref["load_then_shard"], atol=1e-5, rtol=0), directory
    assert not torch.allclose(ref["sharded"], logits(tiny_llama(0)[0], inputs), atol=1e-3)  # training changed it


def test_train_loop_with_fsdp_matches_single_process(tmp_path):
    """``train(..., TrainConfig(fsdp=True))`` on 2 ranks: the saved adapter equals a single-process run on the
    same global batches, including the restore of the best (first evaluated) adapter into sharded parameters."""
    import json

    from safetensors.torch import load_file

    from peftkit.train import train
    from tests.test_train import collate, llama_lora, lm_examples

    reason = _fsdp2_unavailable()
    if reason:
        pytest.skip(reason)
    _launch("loop_worker", tmp_path / "fsdp")
    single = llama_lora()
    metrics = train(single, loop_config(tmp_path / "single", batch_size=4), lm_examples(12), lm_examples(4),
                    collate=collate, evaluate=counting_evaluate())
    assert metrics["best_step"] == 2  # the loop restored step 2's adapter at the end
    saved = load_file(tmp_path / "fsdp" / "adapter" / "adapter.safetensors")
    want = load_file(tmp_path / "single" / "adapter" / "adapter.safetensors")
    assert saved.keys() == want.keys()
    for k in saved:
        assert torch.allclose(saved[k], want[k], atol=1e-5, rtol=0), (k, (saved[k] - want[k]).abs().max())
    sharded_metrics = json.loads((tmp_path / "fsdp" / "metrics.json").read_text())
    assert sharded_metrics["best_step"] == 2
    assert sharded_metrics["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-5)
    with pytest.raises(peftkit.ConfigError, match="fsdp"):
        loop_config(tmp_path, fsdp=True, save_every=1).validate()


if __name__ == "__main__":  # pragma: no cover
    worker(Path(sys.argv[1]))
