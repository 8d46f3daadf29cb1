"""Lazy checkpoint merge: peak RSS against loading every checkpoint, on SmolLM2-135M.

Writes SmolLM2-135M-Instruct's state dict (fp32) as a base checkpoint and two fine-tune stand-ins
(base + small Gaussian perturbations, different seeds), then merges the two against the base
(``--method task_arithmetic`` by default, or ``ties`` with density 0.5) twice, each in a fresh process:

* **lazy**: ``peftkit.merging.merge_checkpoints`` (tensor by tensor, streamed output);
* **eager**: every checkpoint loaded whole with ``safetensors.torch.load_file``, the same method
  applied per tensor, the result saved with ``save_file`` (how a naive script does it).

Each child reports its peak RSS (``ru_maxrss``) and its RSS after imports; the script prints both,
the largest tensor and the largest tensor group (that tensor in the 3 inputs + the result), and
checks that the two outputs are equal.

    nice -n 10 python benchmarks/merge_checkpoint_memory.py --workdir out/ckpt-bench [--method ties] [--reuse]

The method's own temporaries count too: TIES on the 28M-entry embedding holds trimmed copies, signs,
top-k indices and masks, several times the tensor; task arithmetic needs about two.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(workdir: Path, sigma: float) -> dict[str, object]:
    import torch
    from safetensors.torch import save_file

    from peftkit.hub.models import load_causal_lm

    model = load_causal_lm("smollm2-135m")
    model = model[0] if isinstance(model, tuple) else model
    base = {k: v.detach().float().clone().contiguous() for k, v in model.state_dict().items()}
    del model
    workdir.mkdir(parents=True, exist_ok=True)
    save_file(base, str(workdir / "base.safetensors"))
    for i, name in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(i + 1)
        ft = {k: (v + sigma * torch.randn(v.shape, generator=g)) if v.is_floating_point() else v for k, v in base.items()}
        save_file(ft, str(workdir / f"{name}.safetensors"))
        del ft
    largest = max(base.items(), key=lambda kv: kv[1].numel() * kv[1].element_size())
    nbytes = largest[1].numel() * largest[1].element_size()
    return {"tensors": len(base), "total_mb": sum(v.numel() * v.element_size() for v in base.values()) / 2**20,
            "largest": largest[0], "largest_mb": nbytes / 2**20}


def child(kind: str, workdir: Path, method: str) -> None:
    import torch  # noqa: F401

    from peftkit.merging import get_merge_method, make_options, merge_checkpoints

    after_imports = rss_mb()
    t0 = time.perf_counter()
    inputs = [workdir / "a.safetensors", workdir / "b.safetensors"]
    opts = {"density": 0.5} if method == "ties" else {}
    if kind == "lazy":
        merge_checkpoints(inputs, workdir / "lazy", method, [1.0, 1.0], opts, base=workdir / "base.safetensors",
                          progress=False, overwrite=True)
    else:
        from safetensors.torch import load_file, save_file

        m = get_merge_method(method)
        o = make_options(m, opts, 2)
        base = load_file(str(workdir / "base.safetensors"))
        a, b = (load_file(str(p)) for p in inputs)
        out = {}
        for k in base:
            if base[k].is_floating_point():
                out[k] = (base[k] + m([a[k] - base[k], b[k] - base[k]], [1.0, 1.0], o)).contiguous()
            else:
                out[k] = a[k]
        (workdir / "eager").mkdir(exist_ok=True)
        save_file(out, str(workdir / "eager" / "model.safetensors"))
    print(json.dumps({"kind": kind, "after_imports_mb": after_imports, "peak_mb": peak_mb(),
                      "seconds": time.perf_counter() - t0}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="out/ckpt-bench")
    p.add_argument("--sigma", type=float, default=1e-3)
    p.add_argument("--child", choices=["lazy", "eager"])
    p.add_argument("--method", default="task_arithmetic", help="task_arithmetic (default) or ties (density 0.5)")
    p.add_argument("--reuse", action="store_true", help="keep the checkpoints of an earlier run in --workdir")
    a = p.parse_args()
    wd = Path(a.workdir)
    if a.child:
        child(a.child, wd, a.method)
        return
    facts_file = wd / "facts.json"
    if a.reuse and facts_file.is_file():
        facts = json.loads(facts_file.read_text())
    else:
        facts = prepare(wd, a.sigma)
        facts_file.write_text(json.dumps(facts))
    runs = {}
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for kind in ("lazy", "eager"):
        out = subprocess.run([sys.executable, __file__, "--workdir", str(wd), "--child", kind, "--method", a.method],
                             check=True,
                             capture_output=True, text=True, env=env).stdout
        runs[kind] = json.loads(out.strip().splitlines()[-1])
    from safetensors.torch import load_file

    lazy, eager = load_file(str(wd / "lazy" / "model.safetensors")), load_file(str(wd / "eager" / "model.safetensors"))
    same = all(bool((lazy[k] == eager[k]).all()) for k in eager)
    group_mb = 4 * facts["largest_mb"]  # the largest tensor in base, a, b and the result
    lz, eg = runs["lazy"], runs["eager"]
    print(f"{a.method}: SmolLM2-135M fp32: {facts['tensors']} tensors, {facts['total_mb']:.0f} MB per checkpoint; largest tensor "
          f"{facts['largest']} {facts['largest_mb']:.1f} MB (group of 4: {group_mb:.0f} MB)")
    for r in (lz, eg):
        grow = r["peak_mb"] - r["after_imports_mb"]
        print(f"{r['kind']:>5}: peak RSS {r['peak_mb']:.0f} MB (after imports {r['after_imports_mb']:.0f} MB; "
              f"merge adds {grow:.0f} MB = {grow / group_mb:.2f}x the largest tensor group), {r['seconds']:.1f} s")
    print(f"lazy / eager peak RSS: {lz['peak_mb'] / eg['peak_mb']:.3f}; added memory lazy / eager: "
          f"{(lz['peak_mb'] - lz['after_imports_mb']) / (eg['peak_mb'] - eg['after_imports_mb']):.3f}; outputs equal: {same}")


if __name__ == "__main__":
    main()
