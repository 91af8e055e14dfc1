"""A model larger than memory on one machine: ``load_model(..., device_map="auto", max_memory=..., offload_folder=)``.

A tiny config-built model is loaded twice: in memory, and with accelerate keeping part of its layers on
disk (``max_memory`` below the model's size). Patching and node pruning give the same numbers on both.
"""

from __future__ import annotations

import pytest
import torch

import mechbook
from conftest import build_tiny_model, random_circuit_task, sharpen
from mechbook import MechbookError
from mechbook.core.circuits import prune_nodes
from mechbook.core.patching import patch_head_outputs

pytest.importorskip("accelerate")
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-5


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    folder = sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"offload-{request.param}")))
    in_memory = mechbook.load_model(str(folder))
    size = sum(p.numel() * p.element_size() for p in in_memory.hf_model.parameters())
    offloaded = mechbook.load_model(str(folder), device_map="auto", max_memory={"cpu": int(0.7 * size)},
                                    offload_folder=tmp_path_factory.mktemp("offload"))
    return in_memory, offloaded


def test_part_of_the_layers_stays_on_disk(pair):
    """The offloaded modules' weights are on the meta device (read from disk for each forward pass), except the
    q, k, v maps the GPT-2 bridge splits out of the fused c_attn: the bridge builds those in memory."""
    _, offloaded = pair
    placed = offloaded.hf_model.hf_device_map
    assert {"cpu", "disk"} <= set(placed.values()), placed
    on_disk = [name for name, where in placed.items() if where == "disk"]
    params = [(f"{name}.{n}", p) for name in on_disk
              for n, p in offloaded.hf_model.get_submodule(name).named_parameters()]
    in_memory = [n for n, p in params if p.device.type != "meta"]
    split_qkv = [n for n in in_memory if any(f"attn.{x}." in n for x in "qkv")]
    assert in_memory == (split_qkv if offloaded.family == "gpt2" else []), in_memory
    assert sum(p.device.type == "meta" for _, p in params) > len(params) / 2


def test_patching_gives_the_in_memory_numbers(pair):
    in_memory, offloaded = pair
    clean, corrupted, _, metric = random_circuit_task(in_memory)
    want = patch_head_outputs(in_memory, corrupted, clean, metric)
    got = patch_head_outputs(offloaded, corrupted, clean, metric)
    assert list(got.component) == list(want.component)
    assert (got.metric - want.metric).abs().max() < TOL
    assert want.metric.std() > 1e-3  # the heads' patches differ: agreeing means something


def test_node_pruning_gives_the_in_memory_circuit(pair):
    in_memory, offloaded = pair
    clean, _, means, metric = random_circuit_task(in_memory)
    want = prune_nodes(in_memory, clean, means, metric)
    got = prune_nodes(offloaded, clean, means, metric)
    assert got.heads == want.heads and got.mlps == want.mlps
    assert got.score == pytest.approx(want.score, abs=TOL)
    assert len(want.components) < len(mechbook.core.circuits.Circuit.full(in_memory).components)  # it pruned


def test_offload_options_need_device_map_auto(tmp_path):
    folder = build_tiny_model("gpt2", tmp_path / "m")
    with pytest.raises(MechbookError, match="pass device_map='auto' too"):
        mechbook.load_model(str(folder), max_memory={"cpu": 10_000})
    with pytest.raises(MechbookError, match="pass device_map='auto' too"):
        mechbook.load_model(str(folder), offload_folder=tmp_path / "off")
