"""Merging adapters (:class:`~peftkit.core.adapter_state.AdapterState` values) into a new adapter.

Every input must be an adapter of the same method for the same base model; targets may differ
(a module an input does not adapt gets no contribution from it, as in peft) and LoRA ranks may
differ. The result is an ordinary ``AdapterState``, saved and loaded like any other.

**LoRA** (``ΔW_i = s_i B_i A_i`` per module), three spaces:

* ``"concat"`` (default for linear methods: task arithmetic): ``B = [B_1 … B_n]``,
  ``A = [c_1 s_1 A_1; …; c_n s_n A_n]``, scale 1 — exactly ``Σ c_i ΔW_i``, rank ``Σ r_i``; with ``rank``
  the factors are re-factorised to that rank by the truncated SVD computed from their QR
  (:func:`peftkit.merging.lowrank.truncate`), never forming the dense ``ΔW``. peft's ``"cat"``
  (and, with a rank, its ``"svd"``);
* ``"delta"`` (default for every other method): per module ``ΔW_i`` is formed, the method runs
  element-wise on them (TIES, DARE, ... need entries of ``ΔW``), and the result is factorised by
  truncated SVD to ``rank`` (default: the largest input rank). peft's ``"svd"``, ``"ties_svd"``,
  ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``;
* ``"factors"``: the method runs on the ``A``'s and on the ``B``'s separately with weights
  ``sign(c_i s_i)·√|c_i s_i|`` on A and ``√|c_i s_i|`` on B (equal ranks required). A rough
  approximation of merging ``ΔW``, kept because it is peft's ``"linear"``, ``"ties"``,
  ``"dare_linear"``, ``"dare_ties"``, ``"magnitude_prune"``.

**IA3** (``l − 1`` is the task vector) and **BitFit** (``Δb``) merge their vectors element-wise.
Other methods are refused by name, and so are adapters carrying ``modules_to_save`` copies (a
classification head per task: averaging heads whose classes differ means nothing).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..core.errors import ConfigError, did_you_mean
from . import lowrank
from .registry import MaskSource, MergeMethod, MergeOptions, check_weights, get_merge_method, make_options

SPACES = ("auto", "concat", "delta", "factors")
#: methods merged parameter by parameter: {method: {tensor name: the value that means "no change"}}
ADDITIVE: dict[str, dict[str, float]] = {"ia3": {"ia3_l": 1.0}, "bitfit": {"bias_delta": 0.0}}
LOW_RANK = ("lora",)


def check_states(states: Sequence[Any]) -> None:
    """Same method, same base, matching layer shapes; :class:`ConfigError` naming the culprit."""
    if not states:
        raise ConfigError("no adapters to merge")
    ref = states[0]
    method = ref.config.method
    for s in states:
        saved = getattr(s.config, "modules_to_save", None)
        if saved:
            raise ConfigError(f"adapter {s.name!r} carries trained copies of whole modules (modules_to_save: "
                              f"{', '.join(saved)}), e.g. a classification head; heads trained for different tasks "
                              "cannot be averaged meaningfully (their classes differ), so peftkit does not merge "
                              "them: pass saved_modules='drop' to merge the adapters without them (each task keeps "
                              "its own head: peftkit.core.saved_modules.split_saved)")
    if method not in LOW_RANK and method not in ADDITIVE:
        known = list(LOW_RANK) + list(ADDITIVE)
        raise ConfigError(f"adapter {ref.name!r} is a {method!r} adapter; merging supports {', '.join(known)}")
    for s in states[1:]:
        if s.config.method != method:
            raise ConfigError(f"adapter {s.name!r} is a {s.config.method!r} adapter but {ref.name!r} is {method!r}: "
                              "only adapters of one method can be merged")
        for key in ("class", "body_parameters", "name_or_path"):  # task heads may differ
            a, b = (ref.base or {}).get(key), (s.base or {}).get(key)
            if a is not None and b is not None and a != b:
                raise ConfigError(f"adapter {s.name!r} was trained on a different base model ({key} {b!r}) than "
                                  f"{ref.name!r} ({a!r})")
        for path, info in s.layers.items():
            other = ref.layers.get(path) or next((t.layers.get(path) for t in states if path in t.layers), None)
            if other is not None and list(other.get("shape", [])) != list(info.get("shape", [])):
                raise ConfigError(f"module {path}: base weight shape {info.get('shape')} in adapter {s.name!r} but "
                                  f"{other.get('shape')} in another input")
        for k, v in s.shared.items():
            if k in ref.shared and not torch.equal(ref.shared[k], v):
                raise ConfigError(f"shared tensor {k!r} differs between {ref.name!r} and {s.name!r}; "
                                  "their adapters live in different bases and cannot be merged")
    if method in LOW_RANK:
        seen: dict[str, tuple[tuple[int, ...], tuple[int, ...], str]] = {}
        for s in states:
            for path in paths_of(s):
                t = s.module_tensors(path)
                if "lora_A" not in t or "lora_B" not in t:
                    raise ConfigError(f"adapter {s.name!r}: module {path} has no lora_A/lora_B tensors")
                dims = (tuple(t["lora_A"].shape[1:]), (t["lora_B"].shape[0], *t["lora_B"].shape[2:]), s.name)
                if path in seen and seen[path][:2] != dims[:2]:
                    raise ConfigError(f"module {path}: factor shapes A {dims[0]}, B {dims[1]} in adapter {s.name!r} but "
                                      f"A {seen[path][0]}, B {seen[path][1]} in {seen[path][2]!r}")
                seen.setdefault(path, dims)
    for s in states:
        stale = [k for k in s.tensors if k.endswith((".init_A", ".init_B"))]
        if stale:
            raise ConfigError(f"adapter {s.name!r} was initialised with PiSSA/MiLoRA ({stale[0]}); its ΔW is relative "
                              "to a modified base, which merging does not support")


def merge_states(states: Sequence[Any], method: str = "task_arithmetic", weights: Sequence[float] | None = None,
                 options: dict[str, Any] | MergeOptions | None = None, rank: int | None = None,
                 space: str = "auto", name: str = "merged", masks: MaskSource | None = None,
                 progress: bool = False, saved_modules: str = "refuse") -> Any:
    """Merge ``states`` into a new ``AdapterState`` named ``name`` (see the module docstring).

    ``saved_modules``: what to do with inputs carrying ``modules_to_save`` copies (a task head each):
    ``"refuse"`` (default; heads of different tasks do not average) or ``"drop"`` (merge the adapters
    without them; the result has none).
    """
    m = get_merge_method(method)
    if saved_modules not in ("refuse", "drop"):
        raise ConfigError(f"saved_modules={saved_modules!r} is not one of 'refuse', 'drop'"
                          f"{did_you_mean(str(saved_modules), ['refuse', 'drop'])}")
    states = list(states)
    if saved_modules == "drop":
        from ..core.saved_modules import split_saved

        states = [split_saved(s)[0] for s in states]
    w = check_weights(m, weights, len(states), "adapters") or [1.0] * len(states)
    opts = make_options(m, options, len(states))
    if space not in SPACES:
        raise ConfigError(f"space={space!r} is not one of {', '.join(SPACES)}{did_you_mean(str(space), SPACES)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    check_states(states)
    source = masks or MaskSource(getattr(opts, "seed", None))
    if states[0].config.method in ADDITIVE:
        if space not in ("auto", "delta") or rank is not None:
            raise ConfigError(f"{states[0].config.method} adapters merge element-wise: 'space' and 'rank' do not apply")
        return _merge_additive(states, m, w, opts, source, name)
    if space == "auto":
        space = "concat" if m.linear else "delta"
    if space == "concat" and not m.linear:
        raise ConfigError(f"space='concat' is exact only for linear methods (task_arithmetic); {m.name!r} needs "
                          "space='delta' (or peft's approximate space='factors')")
    return _merge_lora(states, m, w, opts, source, rank, space, name, progress)


def paths_of(state: Any) -> list[str]:
    """The module paths ``state`` adapts (its targets; else read off its tensor names)."""
    if state.targets is not None:
        return list(state.targets)
    return list(dict.fromkeys(k.rsplit(".", 1)[0] for k in state.tensors if "." in k))


def _targets(states: Sequence[Any]) -> list[str]:
    seen: dict[str, None] = {}
    for s in states:
        for t in paths_of(s):
            seen.setdefault(t, None)
    return list(seen)


def _layers(states: Sequence[Any], paths: list[str]) -> dict[str, dict[str, Any]]:
    return {p: next((dict(s.layers[p]) for s in states if p in s.layers), {}) for p in paths}


def _lora_parts(state: Any, path: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    t = state.module_tensors(path)
    if "lora_A" not in t:
        return None
    return t["lora_A"], t["lora_B"], float(state.config.scale_for(path))


def _merge_lora(states: list[Any], m: MergeMethod, w: list[float], opts: MergeOptions, masks: MaskSource,
                rank: int | None, space: str, name: str, progress: bool) -> Any:
    if m.name == "task_arithmetic" and getattr(opts, "normalize", False):
        total = sum(w)
        if total == 0:
            raise ConfigError("task_arithmetic with normalize=True needs weights whose sum is not 0")
        w, opts = [x / total for x in w], type(opts)(normalize=False)
    paths = _targets(states)
    if space == "factors":
        ranks = {p: {int(s.module_tensors(p)["lora_A"].shape[0]) for s in states if p in paths_of(s)} for p in paths}
        bad = next((p for p, r in ranks.items() if len(r) > 1), None)
        if bad is not None:
            raise ConfigError(f"space='factors' needs equal ranks; module {bad} has ranks {sorted(ranks[bad])} "
                              "(use space='delta' or 'concat')")
    tensors: dict[str, torch.Tensor] = {}
    out_rank: dict[str, int] = {}
    for path in _progress(paths, progress, f"merging {len(states)} adapters ({m.name}, {space})"):
        parts = [(p, wi) for s, wi in zip(states, w, strict=True) if (p := _lora_parts(s, path)) is not None]
        A_ref, B_ref = parts[0][0][0], parts[0][0][1]
        if space == "concat":
            a, b = lowrank.concat([p[0] for p, _ in parts], [p[1] for p, _ in parts], [wi * p[2] for p, wi in parts])
            if rank is not None and rank < a.shape[0]:
                a, b = lowrank.truncate(a, b, rank)
        elif space == "factors":
            coeff = [wi * p[2] for p, wi in parts]
            wa = [math.copysign(math.sqrt(abs(c)), c) for c in coeff]
            wb = [math.sqrt(abs(c)) for c in coeff]
            a = m([p[0] for p, _ in parts], wa, opts, masks)
            b = m([p[1] for p, _ in parts], wb, opts, masks)
            a, b = lowrank.as_matrices(a, b)
        else:
            deltas = []
            for (A, B, s), _ in parts:
                am, bm = lowrank.as_matrices(A, B)
                deltas.append((bm @ am) * s)
            merged = m(deltas, [wi for _, wi in parts], opts, masks)
            k = rank if rank is not None else max(int(p[0].shape[0]) for p, _ in parts)
            a, b = lowrank.svd_factors(merged, k)
        A_new, B_new = lowrank.like_factors(a, b, A_ref, B_ref)
        tensors[f"{path}.lora_A"], tensors[f"{path}.lora_B"] = A_new, B_new
        out_rank[path] = int(A_new.shape[0])
    return _lora_result(states, tensors, out_rank, paths, name)


def _lora_result(states: list[Any], tensors: dict[str, torch.Tensor], out_rank: dict[str, int],
                 paths: list[str], name: str) -> Any:
    """A LoRA state of scale 1 everywhere: ``r`` the most common rank, exact per-module ranks in ``rank_pattern``."""
    counts: dict[int, int] = {}
    for r in out_rank.values():
        counts[r] = counts.get(r, 0) + 1
    r0 = max(counts, key=lambda r: (counts[r], r))
    pattern = {re.escape(p): r for p, r in out_rank.items() if r != r0}
    config = states[0].config.replace(r=r0, alpha=float(r0), use_rslora=False, rank_pattern=pattern,
                                      alpha_pattern={k: float(v) for k, v in pattern.items()},
                                      target_modules=list(paths), exclude_modules=None, init="default")
    layers = _layers(states, paths)
    return states[0].replace(name=name, config=config, targets=list(paths), tensors=tensors, layers=layers,
                             shared=dict(states[0].shared))


def _merge_additive(states: list[Any], m: MergeMethod, w: list[float], opts: MergeOptions, masks: MaskSource,
                    name: str) -> Any:
    neutral = ADDITIVE[states[0].config.method]
    paths = _targets(states)
    tensors: dict[str, torch.Tensor] = {}
    for path in paths:
        present = [(s.module_tensors(path), wi) for s, wi in zip(states, w, strict=True) if path in paths_of(s)]
        for tname in present[0][0]:
            off = neutral.get(tname, 0.0)
            ref = present[0][0][tname]
            shapes = {tuple(t[tname].shape) for t, _ in present}
            if len(shapes) > 1:
                raise ConfigError(f"tensor {path}.{tname} has shapes {sorted(shapes)} in different inputs")
            merged = m([t[tname].float() - off for t, _ in present], [wi for _, wi in present], opts, masks)
            tensors[f"{path}.{tname}"] = (merged + off).to(ref.dtype)
    layers = _layers(states, paths)
    config = states[0].config.replace(target_modules=list(paths), exclude_modules=None)
    return states[0].replace(name=name, config=config, targets=list(paths), tensors=tensors, layers=layers,
                             shared=dict(states[0].shared))


def _progress(items: list[str], enabled: bool, desc: str) -> Any:
    if not enabled:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="module", leave=False)
