"""A peft ``SEQ_CLS`` LoRA on all-MiniLM-L6-v2 (its head in ``modules_to_save``) through peftkit and back.

    HF_HUB_OFFLINE=1 nice -n 10 python benchmarks/seq_cls_parity.py      # seconds on 2 cores

peft's ``get_peft_model(LoraConfig(task_type="SEQ_CLS", r=8, target_modules=["query", "value"]))`` on the
bundled MiniLM with a new 2-label head; every trainable tensor (LoRA factors and the head's copy) moved by
N(0, 0.05²) noise so that nothing is at its initial value; ``save_pretrained``. Printed: the largest logit
difference of ``peftkit.load`` on a fresh model against peft, whether peftkit's ``format="hf"`` export holds
the same tensor names and shapes as peft's file (and both files' byte counts), and the largest logit
difference of ``PeftModel.from_pretrained`` on peftkit's export. Not a timing: no quiet machine needed.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch

import peftkit


def fresh_model():
    from peftkit.hub.models import load_encoder

    torch.manual_seed(0)  # the same new head every time
    return load_encoder("minilm-l6", num_labels=2)


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.simplefilter("ignore")
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = fresh_model()
    enc = tok(["a gripping, beautifully shot film", "tedious and far too long", "it was fine"], padding=True,
              return_tensors="pt")
    pm = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, target_modules=["query", "value"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        want = pm.eval()(**enc).logits
    work = Path(tempfile.mkdtemp(prefix="seq-cls-parity-"))
    pm.save_pretrained(work / "peft")
    ours, _ = fresh_model()
    peftkit.load(ours, work / "peft")
    with torch.no_grad():
        got = ours.eval()(**enc).logits
    print(f"peft SEQ_CLS file -> peftkit.load: max |logit difference| {float((got - want).abs().max()):.3g}")
    peftkit.save(ours, work / "ours", format="hf")
    theirs, mine = work / "peft" / "adapter_model.safetensors", work / "ours" / "adapter_model.safetensors"
    same = tensor_shapes(theirs) == tensor_shapes(mine)
    print(f"peftkit's export holds peft's tensor names and shapes: {same} ({len(tensor_shapes(mine))} tensors); "
          f"bytes: peft {theirs.stat().st_size:,}, peftkit {mine.stat().st_size:,}")
    base, _ = fresh_model()
    back = PeftModel.from_pretrained(base, work / "ours").eval()
    with torch.no_grad():
        diff = float((back(**enc).logits - want).abs().max())
    print(f"peftkit export -> PeftModel.from_pretrained: max |logit difference| {diff:.3g}")


if __name__ == "__main__":
    main()
