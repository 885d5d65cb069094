"""How close is the browser's top singular value to the exact one? Lanczos steps vs plain power iteration.

    python experiments/browse/sigma_accuracy.py

On the embedded model's expert matrices (all of them, 128 x 128 bf16; lightly trained, so their top
singular values are close together: the hard case for any iterative estimate), for the same number
of matrix-vector products: relative error (exact - estimate) / exact of the browser's Lanczos
estimate (`Kernels(steps=k)`, 2k - 1 products) and of power iteration (k products of A^T A).
"""

from __future__ import annotations

import torch
from safetensors.torch import load_file

from moesurgeon.browse.kernels import Kernels
from moesurgeon.config import asset_path


def power_iteration(a: torch.Tensor, iters: int) -> float:
    v = torch.randn(a.shape[1], generator=torch.Generator().manual_seed(0))
    v = v / v.norm()
    estimate = 0.0
    for _ in range(iters):
        u = a @ v
        w = a.T @ u
        estimate = float(w.norm() / u.norm())
        v = w / w.norm()
    return estimate


def main() -> None:
    tensors = {}
    for shard in sorted(__import__("pathlib").Path(asset_path("reference_model")).glob("model-*.safetensors")):
        tensors.update(load_file(str(shard)))
    mats = [t for name, t in sorted(tensors.items()) if ".experts." in name]
    exact = torch.tensor([float(torch.linalg.matrix_norm(m.double(), 2)) for m in mats], dtype=torch.float64)
    print(f"{len(mats)} expert matrices {tuple(mats[0].shape)} {mats[0].dtype}")
    print("| steps k | mat-vec products | Lanczos median / p90 / max error | power iteration (k iters) median / p90 / max |")
    print("|---|---|---|---|")
    for k in (3, 4, 5, 6):
        lanczos = torch.tensor([Kernels(steps=k).stats(m, sigma=True).sigma1 for m in mats], dtype=torch.float64)
        power = torch.tensor([power_iteration(m.float(), k) for m in mats], dtype=torch.float64)
        cells = []
        for est in (lanczos, power):
            err = (exact - est) / exact
            cells.append(f"{err.median():.2%} / {err.quantile(0.9):.2%} / {err.max():.1%}")
        print(f"| {k} | {2 * k - 1} (power: {2 * k}) | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
