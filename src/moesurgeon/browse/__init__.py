"""A genome browser for MoE checkpoints: every layer and expert as tracks, read straight from the safetensors.

`build_browser(checkpoint_dir, out_dir, ...)` writes `out_dir/index.html` (one self-contained page that
opens from file://, no network) and `out_dir/data.json`. The coordinate axis is the decoder layer; the
tracks are the tensor inventory, per-expert weight statistics, expert x expert similarity, router
geometry, usage overlays from earlier runs and a diff against another checkpoint.

Layers of the package (each module's docstring says more):
- inventory.py (shard headers, tolerant of corrupt shards) -> layout.py (names -> layers, routers,
  experts; the family facts come from the architecture adapter);
- chunks.py (bounded reads on a thread) -> kernels.py (per-chunk statistics) -> scan.py -> cache.py;
- expert_stats.py, similarity.py, router_geometry.py, overlays.py, expert_map.py + diff.py +
  diff_tracks.py, output_similarity.py (needs the model) -> page.py + static/ -> build.py;
- serve.py: the page on 127.0.0.1.
"""

from .build import BrowseSettings, build_browser, preflight
from .errors import BrowseError

__all__ = ["BrowseError", "BrowseSettings", "build_browser", "preflight"]
