"""Where the weights go and in which precision: ``load_model(device=, dtype=)``, and the fast paths' placements.

No GPU is needed. The dtype is checked on tiny models (a local folder, and a packaged
model's cache holding a tiny model). The fast paths' inner loops are checked on the meta
device: there, a tensor made without ``device=`` lands on the CPU, and a list index (which
on a GPU is copied from the host, and waited for, on every call) shows as such, so each
place where a run would copy from the host is caught without a GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import mechbook
from conftest import build_tiny_model
from mechbook.core import loading
from mechbook.book import provenance
from mechbook.core.interventions import edit_hooks, mean_ablation, position_mask
from mechbook.core.names import Component, spans
from mechbook.core.patching import answer_prob, logit_diff
from mechbook.core.architectures import _rows_only
from mechbook.core.runs import TokenBatch, run_last, tokenize
from mechbook.store import cache


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama-devices"))


# --------------------------------------------------------------------------------- dtype


def test_bfloat16_reaches_every_weight_and_the_run(tiny_llama_dir):
    model = mechbook.load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert {p.dtype for p in model.hf_model.parameters()} == {torch.bfloat16}
    assert provenance.placement(model) == {"device": "cpu", "dtype": "bfloat16"}  # what provenance records
    logits, _ = run_last(model, tokenize(model, ["one two three", "January"]))
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, model.d_vocab)
    assert torch.isfinite(logits.float()).all()


def test_a_packaged_model_loads_in_the_dtype_asked_for(tiny_llama_dir, tmp_path, monkeypatch):
    """The dequantized fp32 copy in the cache is cast as it loads (a tiny model stands in for SmolLM2's copy)."""
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    folder = cache.cached_model_dir("smollm2-135m")
    folder.parent.mkdir(parents=True)
    folder.mkdir()
    for path in tiny_llama_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tokenizer = loading._cached_tokenizer(folder, {})
    manifest = {"format": cache.CACHE_FORMAT, "model": "smollm2-135m", "gguf": "(a tiny stand-in)",
                "tokenizer": loading._tokenizer_settings(tokenizer), "files": cache.file_list(folder)}
    (folder / cache.CACHE_MANIFEST).write_text(json.dumps(manifest))
    half = mechbook.load_model("smollm2-135m", dtype=torch.float16)
    assert half.source == "packaged" and {p.dtype for p in half.hf_model.parameters()} == {torch.float16}
    full = mechbook.load_model("smollm2-135m")
    assert full.dtype == torch.float32 and provenance.placement(full)["dtype"] == "float32"
    assert torch.equal(half.hf_model.lm_head.weight, full.hf_model.lm_head.weight.half())


def test_auto_is_cuda_when_torch_sees_a_gpu_else_the_cpu(tiny_llama_dir):
    model = mechbook.load_model(str(tiny_llama_dir), device="auto")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert loading._check_device("auto") in ("cpu", "cuda")


@pytest.mark.parametrize("dtype", ["int8", "bf16", "torch.bool", 3])
def test_a_dtype_that_is_not_a_float_type_is_one_line(tiny_llama_dir, dtype):
    with pytest.raises(mechbook.MechbookError, match="is not a floating-point torch dtype; use one of float32") as e:
        mechbook.load_model(str(tiny_llama_dir), dtype=dtype)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------- no copies from the host


class HostTraffic(TorchFunctionMode):
    """Records every operation that takes or makes a CPU tensor, or indexes with a Python list.

    Run on meta tensors, those are the places where a run on a GPU would copy from the
    host (or back, and wait for it); ``torch.tensor`` of a list is one on any device.
    """

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in ("__getitem__", "__setitem__"):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            self.found += [f"{name} with the list index {i!r}" for i in index if isinstance(i, list)]
        if name in ("tensor", "as_tensor") and isinstance(args[0], (list, tuple)):  # data from the host
            self.found.append(f"torch.{name} of a Python list")
        out = func(*args, **kwargs)
        if name in ("__len__", "size", "dim", "numel", "__get__"):  # shapes and dtypes: no data moves
            return out
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        self.found += [f"{name} on a CPU tensor" for t in tensors if t.device.type == "cpu"]
        return out


def test_the_recorder_sees_what_a_gpu_would_wait_for():
    act = torch.zeros(2, 5, 4, 8, device="meta")
    with HostTraffic() as seen:
        act[:, :, [1, 3]] = 0.0
        torch.arange(2)
        torch.tensor([1, 3], device="meta")
    assert len(seen.found) == 3 and "list index [1, 3]" in seen.found[0] and "arange" in seen.found[1]
    assert seen.found[2] == "torch.tensor of a Python list"


def test_mean_ablation_of_many_heads_indexes_with_slices_on_the_device():
    """The node-pruning inner loop: every head outside a circuit replaced by its mean, in one hook per layer."""
    n, pos, heads, d = 3, 5, 6, 4
    means = {"blocks.1.attn.hook_z": torch.zeros(pos, heads, d, device="meta"),
             "blocks.1.hook_mlp_out": torch.zeros(pos, 16, device="meta")}
    ablated = [Component("head", 1, h) for h in (0, 1, 2, 4)] + [Component("mlp", 1)]
    hooks = dict(edit_hooks(mean_ablation(ablated, means, rows=slice(0, n))))
    with HostTraffic() as seen:
        z = hooks["blocks.1.attn.hook_z"](torch.zeros(2 * n, pos, heads, d, device="meta"), None)
        mlp = hooks["blocks.1.hook_mlp_out"](torch.zeros(2 * n, pos, 16, device="meta"), None)
    assert seen.found == []
    assert z.device.type == mlp.device.type == "meta" and z.shape == (2 * n, pos, heads, d)


def test_the_merged_head_edit_writes_what_one_edit_per_head_writes():
    """Runs of consecutive heads (slices) replace the list index: the same numbers, bit for bit."""
    torch.manual_seed(0)
    act, mean = torch.randn(4, 5, 6, 3), torch.randn(7, 6, 3)
    merged = dict(edit_hooks(mean_ablation([Component("head", 0, h) for h in (5, 0, 1, 3)],
                                           {"blocks.0.attn.hook_z": mean}, rows=slice(1, 3))))
    want = act.clone()
    for h in (5, 0, 1, 3):
        want[1:3, :, h] = mean[:5, h]
    assert torch.equal(merged["blocks.0.attn.hook_z"](act, None), want)
    assert spans([5, 0, 1, 3, 1]) == [(0, 2), (3, 4), (5, 6)]


def test_skipped_heads_compute_their_kept_rows_without_an_index_tensor():
    linear = torch.nn.Linear(8, 6 * 4, bias=True)
    x = torch.randn(2, 3, 8)
    forward = _rows_only(linear, [0, 1, 4], 4)
    kept = [*range(0, 8), *range(16, 20)]
    out = forward(x)
    assert torch.equal(out[..., kept], torch.nn.functional.linear(x, linear.weight[kept], linear.bias[kept]))
    assert not out[..., [i for i in range(24) if i not in kept]].any()
    on_meta = torch.nn.Linear(8, 6 * 4, device="meta")
    with HostTraffic() as seen:
        out = _rows_only(on_meta, [0, 1, 4], 4)(torch.zeros(2, 3, 8, device="meta"))
    assert seen.found == [] and out.device.type == "meta"


@pytest.mark.parametrize("make", [lambda: logit_diff(torch.tensor([1, 2]), torch.tensor([3, 4])),
                                  lambda: answer_prob(torch.tensor([1, 2]))])
def test_a_metric_copies_its_ids_to_the_device_once(make, monkeypatch):
    """A sweep calls its metric once per pass: the answer ids go to the logits' device on the first call only.

    The metric's checks that the logits are finite and not degenerate read one bool back per
    call (a NaN or an all-equal row must stop the run), which the meta device cannot answer:
    they are left out here.
    """
    from mechbook.core import patching

    monkeypatch.setattr(patching, "check_finite", lambda values, what: values)
    monkeypatch.setattr(patching, "check_logits", lambda values, what: values)
    metric = make()
    logits = torch.zeros(3, 2, 10, device="meta")
    metric(logits)
    with HostTraffic() as seen:
        value = metric(logits)
    assert seen.found == [] and value.shape == (3, 2) and value.device.type == "meta"


def test_position_masks_are_made_on_the_batch_device():
    batch = TokenBatch(torch.zeros(2, 4, dtype=torch.long, device="meta"),
                       torch.tensor([4, 2]).to("meta"))
    with HostTraffic() as seen:
        masks = [position_mask(batch, p, skip_bos=True) for p in ("last", "all")]
    assert seen.found == [] and {m.device.type for m in masks} == {"meta"}
