"""``peftkit.summary``: a table of the adapters attached to a model."""

from __future__ import annotations

from torch import nn

from .model import active_names, adapter_modules, adapter_names


class Table(str):
    """A string that shows itself as-is in a REPL or notebook."""

    def __repr__(self) -> str:
        return str(self)


def summary(model: nn.Module) -> Table:
    """One row per adapter: method, number of targeted modules, trainable parameters and % of the base model."""
    adapter_ids = set()
    rows = []
    for name in adapter_names(model):
        mods = list(adapter_modules(model, name))
        params = [p for _, _, m in mods for p in m.parameters()]
        for p in params:
            adapter_ids.add(id(p))
        n_params = sum(p.numel() for p in params)
        n_train = sum(p.numel() for p in params if p.requires_grad)
        targets = [path for path, _, _ in mods]
        shown = _short_targets(targets)
        rows.append((name, mods[0][2].config.method, str(len(targets)), shown, f"{n_params:,}", f"{n_train:,}"))
    base_total = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
    other_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in adapter_ids)
    header = ("adapter", "method", "modules", "targets", "params", "trainable")
    pct = []
    for r in rows:
        n = int(r[4].replace(",", ""))
        pct.append(f"{100.0 * n / max(base_total, 1):.4f}%")
    out = [format_table((*header, "% of base"), [(*r, p) for r, p in zip(rows, pct, strict=True)])]
    out.append(f"base model: {type(model).__name__}, {base_total:,} parameters"
               + (f" ({other_trainable:,} non-adapter parameters trainable)" if other_trainable else ""))
    out.append(f"active: {', '.join(active_names(model)) or 'none'}")
    return Table("\n".join(out))


def format_table(header: tuple[str, ...] | list[str], rows: list) -> Table:
    """A plain-text table: the header, a rule, one line per row; columns padded to their widest cell."""
    data = [tuple(header), *[tuple(str(c) for c in r) for r in rows]]
    widths = [max(len(r[i]) for r in data) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return Table("\n".join([fmt(data[0]), "  ".join("-" * w for w in widths), *[fmt(r) for r in data[1:]]]))


def _short_targets(paths: list[str]) -> str:
    leaves: dict[str, None] = {}
    for p in paths:
        leaves.setdefault(p.rsplit(".", 1)[-1], None)
    text = ",".join(leaves)
    return text if len(text) <= 48 else text[:45] + "..."
