"""Browser pages and screenshots of the embedded model and of two exports of it (experiments/browse/README.md).

    python experiments/browse/figures.py --usage RUN_usage --pruned RUN_prune/checkpoint --lora RUN_lora/checkpoint

Builds the pages with `build_browser` (what `python -m moesurgeon experiment=browse` runs) and photographs
views of them with headless Chromium, selected through the URL hash as a reader's link would:
- embedded_overview.png  the embedded model with the usage overlay of a router_usage run
- embedded_layer.png     layer 2, expert 5: per-expert bars, similarity and router matrices
- pruned_diff.png        the pruned export (experts 3 and 7 removed) against the embedded model
- lora_diff.png          the router-LoRA export against the embedded model, layer 1
The pages themselves stay in --work (self-contained; open index.html from file://).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from moesurgeon.browse import build_browser
from moesurgeon.config import asset_path

HERE = Path(__file__).resolve().parent
# expert-weight tracks folded away where the figure is about something else
FOLD = "hide=x-norm,x-rms,x-maxabs,x-nearzero,s-down_proj.weight,s-gate_proj.weight,s-up_proj.weight"


def shoot(page: Path, view: str, out: Path, size: str) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("headless Chromium is needed for the screenshots (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=8000",
                        f"--screenshot={out}", page.as_uri() + view], check=True, capture_output=True)
    print("wrote", out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--usage", type=Path, required=True, help="run dir of experiment=router_usage")
    ap.add_argument("--pruned", type=Path, required=True, help="checkpoint of the expert_mask role_router run")
    ap.add_argument("--lora", type=Path, required=True, help="checkpoint of the router_lora run")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "browse_figures")
    args = ap.parse_args()
    embedded = Path(os.path.relpath(asset_path("reference_model")))  # the banner names it as given
    pages = {}
    for name, ckpt, kw, title in (
            ("embedded", embedded, {"usage": [args.usage]}, "embedded reference model"),
            ("pruned", args.pruned, {"compare_to": embedded}, "pruned export (experts 3, 7 removed) vs embedded model"),
            ("lora", args.lora, {"compare_to": embedded}, "router-LoRA export vs embedded model")):
        metrics = build_browser(ckpt, args.work / name, cache_dir=args.work / "cache", progress=False, title=title,
                                **kw)
        pages[name] = Path(metrics["browse/page"])
    shoot(pages["embedded"], "", HERE / "embedded_overview.png", "1400,1500")
    shoot(pages["embedded"], "#layer=2&expert=5&fold=1", HERE / "embedded_layer.png", "1400,1700")
    shoot(pages["pruned"], f"#layer=1&{FOLD}", HERE / "pruned_diff.png", "1400,1000")
    shoot(pages["lora"], f"#layer=1&{FOLD}", HERE / "lora_diff.png", "1400,2100")


if __name__ == "__main__":
    main()
