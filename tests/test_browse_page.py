"""Checkpoint browser page: opened in a real headless Chromium (no JavaScript errors, a screenshot that is
not blank, a view selected through the URL hash draws something else), the HTML escaping of the
embedded data, the 127.0.0.1 server, output similarity, and `experiment=browse` through Hydra."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from urllib.parse import quote

import pytest
import torch

from moesurgeon.arch import get_adapter
from moesurgeon.browse import build_browser
from moesurgeon.browse.output_similarity import expert_output_similarity
from moesurgeon.browse.page import render
from moesurgeon.browse.serve import start_server
from moesurgeon.data import TokenBlocks
from moesurgeon.probe import UsageStats
from tiny_models import tiny_model, write_tiny_jsonl

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# the marker of the real-browser test: skipped, with this reason, where Chromium is not installed
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not found (Debian: apt-get install "
                                                             "chromium); the browser page test needs it")


def blocks_of(ids: torch.Tensor) -> TokenBlocks:
    return TokenBlocks(ids, torch.ones_like(ids), torch.zeros(ids.shape[0], dtype=torch.long), [])


@pytest.fixture(scope="module")
def page_dir(tmp_path_factory):
    """A page with every track: tiny qwen3 + usage overlay + output similarity + a diff against a router edit."""
    root = tmp_path_factory.mktemp("page")
    model = tiny_model("qwen3_moe")
    model.save_pretrained(root / "ckpt", max_shard_size="60KB")
    with torch.no_grad():
        model.model.layers[2].mlp.gate.weight[3] *= 1.5
    model.save_pretrained(root / "edited", max_shard_size="60KB")
    stats = UsageStats.zeros(["model.layers.0.mlp.gate", "model.layers.2.mlp.gate"], ["all"], 8, [2, 2])
    stats.counts[:, 0] = torch.arange(8) + 1
    stats.save(root / "usage_stats.safetensors")
    outputs = expert_output_similarity(model, get_adapter(model), blocks_of(torch.randint(3, 90, (2, 16))),
                                       max_tokens=24)
    build_browser(root / "edited", root / "out", usage=[root / "usage_stats.safetensors"], compare_to=root / "ckpt",
                  output_similarity=outputs, cache_dir=None, progress=False, title="tiny </script> & co")
    return root / "out"


def chromium(args: list[str], url: str, profile) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--virtual-time-budget=8000", "--window-size=1300,1500", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@needs_chromium
def test_page_in_headless_chromium(page_dir, tmp_path):
    """Open the whole-model view, fingerprint its canvases, then select layer 2 / expert 3 through the URL hash
    (the page's ?probe=HASH does the hash change after the first view is drawn): no JavaScript error, the
    expert view is drawn and its pixels differ; a screenshot of that view is not blank."""
    from PIL import Image

    url = (page_dir / "index.html").as_uri() + "?probe=" + quote("layer=2&expert=3")
    dom = chromium(["--dump-dom"], url, tmp_path / "p1").stdout
    facts = dict(re.findall(r'data-(js-errors|view|canvas-ink|canvas-sum|first-sum)="([^"]*)"', dom))
    assert facts.get("js-errors") == "0", dom[-3000:]
    assert facts["view"] == "layer=2;expert=3;lo=0;hi=2"
    assert 'id="expert-title">Layer 2 · expert 3<' in dom and 'id="layer-title">Layer 2 ' in dom
    assert int(facts["canvas-ink"]) > 10_000
    assert facts["first-sum"] and facts["first-sum"] != facts["canvas-sum"]
    shot = tmp_path / "shot.png"
    chromium([f"--screenshot={shot}"], url, tmp_path / "p2")
    image = Image.open(shot).convert("RGB")
    colours = image.getcolors(maxcolors=1 << 20)
    white = max((count for count, rgb in colours if rgb == (255, 255, 255)), default=0)
    assert len(colours) > 200 and white < 0.8 * image.width * image.height


def test_embedded_data_cannot_close_the_script_tag(page_dir):
    html = (page_dir / "index.html").read_text()
    data = json.loads((page_dir / "data.json").read_text())
    assert data["title"] == "tiny </script> & co"
    body = re.search(r'<script type="application/json" id="browse-data">(.*?)</script>', html, re.S).group(1)
    assert json.loads(body)["title"] == "tiny </script> & co" and "</script>" not in body
    assert "<title>tiny &lt;/script&gt; &amp; co" in html
    assert render({"title": "x", "model": {}}).count("/*DATA*/") == 0


def test_server_binds_loopback_only(page_dir):
    server, url = start_server(page_dir)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/index.html")
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200 and b"browse-data" in reply.read()
    finally:
        server.shutdown()
        server.server_close()


def test_experiment_browse(tiny_checkpoint, tmp_path):
    from helpers_hydra import compose_cfg
    from moesurgeon.runner import run_experiment

    ckpt = tiny_checkpoint("olmoe")
    data = write_tiny_jsonl(tmp_path / "data.jsonl", repeat=1)
    cfg = compose_cfg(["experiment=browse", f"model.path={ckpt}", "data=jsonl", f"data.heldout.path={data}",
                       "data.block_size=32", "progress=false", "browse.data=true", "browse.data_tokens=40"])
    run = tmp_path / "runs" / "one"
    metrics = run_experiment(cfg, run)
    assert metrics["success"] is True and metrics["browse/moe_layers"] == 3
    page = json.loads((run / "browser" / "data.json").read_text())
    assert sorted(page["output_similarity"]) == ["0", "1", "2"]
    assert all(v["tokens"] == 40 for v in page["output_similarity"].values())
    assert (tmp_path / "runs" / "browse_cache").is_dir()  # shared by the runs of this experiment
    again = run_experiment(compose_cfg(["experiment=browse", f"model.path={ckpt}", "progress=false"]),
                           tmp_path / "runs" / "two")
    assert again["browse/shards_read"] == 0 and again["browse/shards_cached"] == metrics["browse/shards"]
    # only the weight files are read: a checkpoint without tokenizer files is browsed all the same
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ckpt.iterdir():
        if f.suffix in (".safetensors", ".json") and "tokenizer" not in f.name and f.name != "special_tokens_map.json":
            (bare / f.name).write_bytes(f.read_bytes())
    assert not any("tokenizer" in f.name for f in bare.iterdir())
    bare_run = run_experiment(compose_cfg(["experiment=browse", f"model.path={bare}", "progress=false"]),
                              tmp_path / "runs" / "bare")
    assert bare_run["success"] is True and bare_run["browse/moe_layers"] == 3
    with pytest.raises(Exception, match="browse.chunk_mb=0"):
        run_experiment(compose_cfg(["experiment=browse", f"model.path={ckpt}", "browse.chunk_mb=0"]),
                       tmp_path / "runs" / "bad")
