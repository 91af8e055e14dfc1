"""Offloading to disk: patching and node pruning on a tiny model kept partly on disk, against the in-memory model.

For each architecture a tiny, config-built model (as in ``tests/core/test_offload.py``) is loaded in
memory and again with ``device_map="auto"``, ``max_memory={"cpu": fraction x its size}`` and an
offload folder, so accelerate keeps the layers that do not fit on disk. Printed per model: its size,
which modules went to disk, the largest difference of a head-output patching sweep, whether node
pruning finds the same circuit (and the difference of its score), and the times of both runs.

Usage:

    python benchmarks/offload_parity.py                 # gpt2 and llama, 70% of the model in memory
    python benchmarks/offload_parity.py --fraction 0.5
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import mechbook  # noqa: E402
from conftest import build_tiny_model, random_circuit_task, sharpen  # noqa: E402
from mechbook.core.circuits import prune_nodes  # noqa: E402
from mechbook.core.patching import patch_head_outputs  # noqa: E402


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def compare(kind: str, fraction: float) -> dict:
    folder = sharpen(build_tiny_model(kind, Path(tempfile.mkdtemp(prefix=f"offload-{kind}-"))))
    memory = mechbook.load_model(str(folder))
    size = sum(p.numel() * p.element_size() for p in memory.hf_model.parameters())
    disk = mechbook.load_model(str(folder), device_map="auto", max_memory={"cpu": int(fraction * size)},
                               offload_folder=tempfile.mkdtemp(prefix="offload-"))
    clean, corrupted, means, metric = random_circuit_task(memory)
    (want, t_mem), (got, t_disk) = (_timed(patch_head_outputs, m, corrupted, clean, metric) for m in (memory, disk))
    (c_mem, p_mem), (c_disk, p_disk) = (_timed(prune_nodes, m, clean, means, metric) for m in (memory, disk))
    return {
        "model": kind, "bytes": size, "on disk": [n for n, w in disk.hf_model.hf_device_map.items() if w == "disk"],
        "patch max diff": float((got.metric - want.metric).abs().max()), "patch s (disk / memory)": (t_disk, t_mem),
        "same circuit": c_mem.heads == c_disk.heads and c_mem.mlps == c_disk.mlps,
        "score diff": abs(c_mem.score - c_disk.score), "prune s (disk / memory)": (p_disk, p_mem),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], help="tiny architectures (tests/conftest.py)")
    parser.add_argument("--fraction", type=float, default=0.7, help="share of the model's bytes allowed in memory")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for kind in args.models:
        row = compare(kind, args.fraction)
        print(" | ".join(f"{k}: {v[0]:.3f} / {v[1]:.3f}" if isinstance(v, tuple) else f"{k}: {v}"
                         for k, v in row.items()))


if __name__ == "__main__":
    main()
