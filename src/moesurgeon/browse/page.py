"""Assemble the page: the data as JSON inside one HTML file with the style and scripts inlined.

`static/` (package data) holds `template.html`, `browser.css` and the scripts, loaded in the order of
`SCRIPTS`. The page needs nothing else: no network, no server; it opens from file://. The same data
is written as `data.json` beside it for scripts and tests.

Numbers are rounded to 6 significant digits (the tooltips show them as they are); NaN and infinity
become null, which the page shows as "n/a".
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from importlib import resources
from pathlib import Path

from .inventory import Inventory
from .layout import ModelLayout

SCRIPTS = ("util.js", "state.js", "draw.js", "tracks.js", "panels.js", "main.js")
FORMAT = "moesurgeon.browse.v1"
_MARKERS = re.compile(r"/\*STYLE\*/|/\*SCRIPT\*/|/\*DATA\*/|\{\{TITLE\}\}")


def _number(v):
    return (float(f"{v:.6g}") if math.isfinite(v) else None) if type(v) is float else v


def compact(value):
    """JSON-ready copy: floats to 6 significant digits, NaN/inf -> None, tuples -> lists, keys -> str.

    Lists of plain numbers (matrices' rows, per-expert values: most of a large model's data) take one
    comprehension instead of a call per element."""
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, dict):
        return {str(k): compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if all(type(v) in (float, int, bool) or v is None for v in value):
            return [_number(v) for v in value]
        return [compact(v) for v in value]
    return value


def page_data(title: str, inv: Inventory, layout: ModelLayout, *, settings: dict, pending: bool,
              tensor_stats: dict | None = None, experts: dict | None = None, similarity: dict | None = None,
              output_similarity: dict | None = None, router: dict | None = None,
              overlays: list | None = None) -> dict:
    shard_index = {name: i for i, name in enumerate(inv.shards)}
    names = list(inv.tensors)
    stats = tensor_stats or {}
    expert_of = {p.tensor: e for lay in layout.layers.values() for e, parts in lay.parts.items()
                 for p in parts if not p.fused}
    columns = {"name": names, "shape": [], "dtype": [], "bytes": [], "shard": [], "layer": [], "role": [],
               "expert": [expert_of.get(n) for n in names]}
    for name in names:
        meta = inv.tensors[name]
        columns["shape"].append(list(meta.shape) if meta.shape is not None else None)
        columns["dtype"].append(meta.dtype)
        columns["bytes"].append(meta.nbytes)
        columns["shard"].append(shard_index.get(meta.shard))
        columns["layer"].append(layout.tensor_layer.get(name))
        columns["role"].append(layout.tensor_role.get(name, "model"))
    for key in ("norm", "rms", "maxabs", "nearzero", "sigma1", "nonfinite", "error"):
        columns[key] = [stats.get(n, {}).get(key) for n in names]
    return {
        "format": FORMAT, "title": title, "path": str(inv.root), "pending": pending,
        "generated": _dt.datetime.now().isoformat(timespec="seconds"), "settings": settings,
        "model": {"model_type": layout.model_type, "num_layers": layout.num_layers,
                  "num_experts": layout.num_experts, "top_k": layout.top_k, "moe_layers": sorted(layout.layers),
                  "storage": {i: lay.storage for i, lay in layout.layers.items()},
                  "experts_present": {i: len(lay.parts) for i, lay in layout.layers.items()},
                  "notes": layout.notes},
        "problems": inv.problems,
        "shards": [{"name": s.name, "size": s.size, "ok": s.ok, "error": s.error} for s in inv.shards.values()],
        "total_bytes": inv.total_bytes,
        "tensors": columns,
        "experts": experts or {"layers": {}, "labels": {}},
        "similarity": similarity or {}, "output_similarity": output_similarity or {},
        "router": router or {}, "overlays": overlays or [], "diff": None,
    }


def _asset(name: str) -> str:
    return (resources.files("moesurgeon.browse") / "static" / name).read_text(encoding="utf-8")


def _json(data: dict) -> str:
    return json.dumps(data, allow_nan=False, separators=(",", ":"))


def render(data: dict, *, compacted: bool = False, payload: str | None = None) -> str:
    """The whole page as one string (`compacted`: `data` already went through `compact`; `payload`: its JSON,
    when the caller has serialised it already)."""
    if payload is None:
        payload = _json(data if compacted else compact(data))
    # "<" only occurs inside JSON strings, where \u003c means the same: no "</script>" can end the tag early
    payload = payload.replace("<", "\\u003c")
    script = "\n".join(f"// ---- {name}\n{_asset(name)}" for name in SCRIPTS)
    table = {"/*STYLE*/": _asset("browser.css"), "/*SCRIPT*/": script, "/*DATA*/": payload,
             "{{TITLE}}": _html_escape(str(data.get("title", "checkpoint")))}
    # one pass: text inserted for one marker is never searched for the next
    return _MARKERS.sub(lambda m: table[m.group(0)], _asset("template.html"))


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def write_page(out_dir: Path, data: dict) -> Path:
    """Write index.html and data.json atomically (a reader never sees half a page); return the page path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "index.html"
    data = compact(data)
    payload = _json(data)  # data.json and the page's embedded data are the same JSON: serialise it once
    for path, text in ((out_dir / "data.json", payload), (page, render(data, compacted=True, payload=payload))):
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    return page
