"""``load_model(name, backend="ndif")``: no weights here, and the same numbers as the local backend with weights.

NDIF cannot be reached from here, so the server is stood in for (tests/ndif_stand_in.py): the model is built from a
folder holding only a tiny model's config and tokenizer (as the hub's config and tokenizer files would be), on the
meta device; each trace is serialized as for NDIF, deserialized with mechbook's modules hidden against a second
nnsight model that holds the tiny model's weights (the "server"), and run there. Nothing of the weightless model
ever computes here: its tensors have no data.
"""

from __future__ import annotations

import shutil

import pytest
import torch

pytest.importorskip("nnsight")

import mechbook  # noqa: E402
from conftest import build_tiny_model, head_patching_case, random_batch, sharpen  # noqa: E402
from ndif_stand_in import serve_from  # noqa: E402
from mechbook.core import architectures, decoding, loading  # noqa: E402
from mechbook.nnsight_backend import ndif  # noqa: E402
from mechbook.nnsight_backend import weightless as built_here  # noqa: E402
from mechbook.nnsight_backend import runner as nn_runner  # noqa: E402
from mechbook.core.errors import MechbookError  # noqa: E402
from mechbook.core.names import act_name, layer_names  # noqa: E402
from mechbook.core.runs import run_from_layer, run_last  # noqa: E402
from mechbook.store import hub  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RTOL, ATOL = 1e-4, 1e-5
POSING_AS = {"gpt2": "gpt2", "llama": "meta-llama/Llama-3.1-8B"}  # a registry name, and one NDIF serves only


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    """(local model with weights, the same model loaded for NDIF from its config alone, the config folder)."""
    full = sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"weights-{request.param}")))
    config_only = tmp_path_factory.mktemp(f"config-{request.param}")
    for file in full.iterdir():
        if not file.name.endswith(".safetensors"):
            shutil.copy(file, config_only / file.name)
    local = mechbook.load_model(str(full))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NDIF_API_KEY", "test-key")
        patch.setattr(built_here, "config_folder", lambda hub_id: config_only)
        weightless = mechbook.load_model(POSING_AS[request.param], backend="ndif")
    serve_from(weightless, full)  # its remote traces (remote=True) go to a stand-in server with the weights
    return local, weightless, config_only


def _close(got, want) -> None:
    assert got.shape == want.shape and torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=RTOL, atol=ATOL)


def test_no_weights_here_only_a_meta_model_and_the_same_facts(pair):
    local, weightless, _ = pair
    assert not weightless.weights_here and weightless.bridge is None and weightless.backend == "ndif"
    assert weightless.runner.remote is True and weightless.device == torch.device("cpu")
    assert all(p.device.type == "meta" for p in weightless.hf_model.parameters())
    facts = ("n_layers", "n_heads", "n_kv_heads", "d_model", "d_head", "d_vocab", "prepend_bos", "family")
    assert {f: getattr(weightless, f) for f in facts} == {f: getattr(local, f) for f in facts}


def test_decoding_runs_on_the_server_and_matches_local(pair):
    local, weightless, _ = pair
    batch = random_batch(local)
    names = layer_names("resid_post", local.n_layers)
    _, cache = run_last(local, batch, names=names, last_only=True)
    resid = decoding.stack_layers(cache, names)  # [batch, layer, d_model]
    before = weightless.runner.traces
    _close(decoding.unembed(weightless, resid), decoding.unembed(local, resid))
    assert weightless.runner.traces == before + 1  # decoded in a request, not here
    tokens = torch.tensor([4, 9, 30])
    _close(decoding.unembed(weightless, resid, tokens=tokens), decoding.unembed(local, resid, tokens=tokens))
    ids = torch.randint(3, 300, resid.shape[:2], generator=torch.Generator().manual_seed(1))
    _close(decoding.token_logits(weightless, resid, ids), decoding.token_logits(local, resid, ids))
    targets = {"a": ids[:, 0], "b": ids[:, 1]}
    got, want = decoding.logit_lens(weightless, resid, targets), decoding.logit_lens(local, resid, targets)
    assert got[["prompt", "layer", "target", "token", "rank", "top_token"]].equals(
        want[["prompt", "layer", "target", "token", "rank", "top_token"]])
    torch.testing.assert_close(torch.tensor(got["prob"].values), torch.tensor(want["prob"].values), rtol=RTOL, atol=0)
    got, want = decoding.top_tokens(weightless, resid[0, -1], k=5), decoding.top_tokens(local, resid[0, -1], k=5)
    assert got["token"].tolist() == want["token"].tolist()
    torch.testing.assert_close(torch.tensor(got["logit"].values), torch.tensor(want["logit"].values), rtol=RTOL, atol=0)


def test_runs_and_patching_match_local(pair):
    local, weightless, _ = pair
    batch = random_batch(local, seed=2)
    names = [act_name("z", 1), act_name("resid_pre", 2), act_name("final")]
    want, want_cache = run_last(local, batch, names=names)
    got, got_cache = run_last(weightless, batch, names=names)
    _close(got, want)
    for name in names:
        _close(got_cache[name], want_cache[name])
    resid = want_cache[act_name("resid_pre", 2)]
    _close(run_from_layer(weightless, resid, 2, batch.last_pos)[0], run_from_layer(local, resid, 2, batch.last_pos)[0])
    case = head_patching_case(local, weightless)
    assert (case.want.metric - case.unpatched).abs().max() > 1e-3  # patches matter
    torch.testing.assert_close(torch.tensor(case.got.metric.values), torch.tensor(case.want.metric.values),
                               rtol=RTOL, atol=ATOL)


def test_decoding_many_vectors_is_split_under_the_request_cap(pair, monkeypatch):
    local, weightless, _ = pair
    resid = torch.randn(5, 2, local.d_model, generator=torch.Generator().manual_seed(3))
    one = nn_runner.request_bytes(weightless, torch.zeros(1, 1, dtype=torch.long), [], resid=resid[:1, :1])
    monkeypatch.setattr(nn_runner, "MAX_REQUEST_BYTES", 3 * one)  # three vectors a request: 10 -> 4 requests
    before = weightless.runner.traces
    _close(decoding.unembed(weightless, resid), decoding.unembed(local, resid))
    assert weightless.runner.traces == before + 4


def _one_line(exc: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(exc.value)
    return str(exc.value)


@pytest.mark.parametrize("what", ["ov_circuit", "project", "attention_write", "final_norm", "unembed raw",
                                  "use local", "use nnsight"])
def test_what_needs_the_weights_here_is_refused_in_one_line(pair, what):
    _, weightless, _ = pair
    resid = torch.zeros(1, 2, weightless.d_model)
    calls = {
        "ov_circuit": lambda: architectures.ov_circuit(weightless, 1, 0),
        "project": lambda: architectures.project(weightless, 1, "q", resid),
        "attention_write": lambda: architectures.attention_write(weightless, 1, torch.zeros(1, 2, 4, 16)),
        "final_norm": lambda: decoding.final_norm(weightless, resid),
        "unembed raw": lambda: decoding.unembed(weightless, resid, normalize=False),
        "use local": lambda: mechbook.use_backend(weightless, "local"),
        "use nnsight": lambda: mechbook.use_backend(weightless, "nnsight"),
    }
    with pytest.raises(MechbookError) as exc:
        calls[what]()
    text = _one_line(exc)
    assert "loaded for NDIF without" in text and ("--backend nnsight" in text or "backend='" in text), text


@pytest.mark.parametrize("kwargs", [{"dtype": torch.float16}, {"device": "cuda"}, {"device_map": "auto"}])
def test_placement_arguments_are_refused_with_ndif(kwargs, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setattr(built_here, "config_folder", lambda hub_id: pytest.fail("the config was fetched"))
    with pytest.raises(MechbookError, match=f"{next(iter(kwargs))}= does not apply to backend='ndif'") as exc:
        mechbook.load_model("gpt2", backend="ndif", **kwargs)
    _one_line(exc)


def test_every_model_ndif_serves_loads_from_its_config_alone(pair, monkeypatch):
    """Each name of NDIF_MODELS (the Llama-3.1 ones are not in the registry) builds, its files fetched by hub id."""
    _, _, config_only = pair
    asked = []
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setattr(built_here, "config_folder", lambda hub_id: asked.append(hub_id) or config_only)
    monkeypatch.setattr(loading, "_load_with_weights", lambda *a, **k: pytest.fail("weights were loaded"))
    for name, hub_id in ndif.NDIF_MODELS.items():
        model = mechbook.load_model(name, backend="ndif")
        assert model.name == name and not model.weights_here and model.runner.lm.repo_id == hub_id
    assert asked == [loading.REGISTRY[n].hub_id if n in loading.REGISTRY else h for n, h in ndif.NDIF_MODELS.items()]
    monkeypatch.undo()
    for backend in ("local", "nnsight"):  # the other backends still refuse what they cannot load
        with pytest.raises(MechbookError, match="unknown model 'meta-llama/Llama-3.1-8B'") as exc:
            mechbook.load_model("meta-llama/Llama-3.1-8B", backend=backend)
        _one_line(exc)


def test_ndif_refuses_a_model_it_does_not_serve_and_no_network_in_one_line(monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    with pytest.raises(MechbookError, match="NDIF does not serve 'gemma3-270m'") as exc:
        mechbook.load_model("gemma3-270m", backend="ndif")
    _one_line(exc)
    monkeypatch.setattr(hub, "hub_unreachable", lambda: "no network in the tests")
    with pytest.raises(MechbookError, match=r"needs the config and tokenizer of 'meta-llama/Llama-3.1-405B' \(no "
                                            "weights\\).*huggingface-cli download") as exc:
        mechbook.load_model("meta-llama/Llama-3.1-405B", backend="ndif")
    _one_line(exc)


def test_the_backend_is_recorded_from_the_chapters_model(pair):
    from mechbook.book import provenance

    local, weightless, _ = pair
    assert provenance.record(None, mechbook.use_backend(local, "local"))["backend"] == "local"
    found = provenance.record(None, mechbook.use_backend(weightless, "ndif"))
    assert found["backend"] == "ndif" and "device" not in found  # the weights are NDIF's
