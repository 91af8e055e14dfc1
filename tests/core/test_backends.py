"""The nnsight backend equals the local bridge within 1e-4 on every core entry point, here and through
nnsight's remote serialization (``remote="local"``, the stand-in for NDIF); backend errors are one line.

Each family is a tiny config-built model with sharpened attention (tests/conftest.py), loaded once and
put on three backends sharing its weights: the local bridge, nnsight, and nnsight with ``remote="local"``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("nnsight")

import mechbook  # noqa: E402
from conftest import build_tiny_model, head_patching_case, random_batch, sharpen  # noqa: E402
from mechbook import backends  # noqa: E402
from mechbook.nnsight_backend import runner as nn_runner  # noqa: E402
from mechbook.core.errors import MechbookError  # noqa: E402
from mechbook.core.interventions import Edit, edit_hooks  # noqa: E402
from mechbook.core.names import Component, act_name, layer_names  # noqa: E402
from mechbook.core.patching import ablate, mean_activations  # noqa: E402
from mechbook.core.runs import run_from_layer, run_last, tokenize  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4
KINDS = ("resid_pre", "resid_mid", "attn_out", "z", "q", "k", "v", "mlp_out", "resid_post")


def _load(directory):
    local = mechbook.load_model(str(directory))
    return {"local": local, "nnsight": backends.use_backend(local, "nnsight"),
            "remote-local": backends.use_backend(local, "nnsight", remote="local")}


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def models(request, tmp_path_factory):
    return _load(sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"backend-{request.param}"))))


@pytest.fixture(params=["nnsight", "remote-local"])
def backend(request):
    return request.param


def _names(model):
    return [name for kind in KINDS for name in layer_names(kind, model.n_layers)] + [act_name("final")]


def _diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def test_the_backends_share_weights_and_differ_in_where_they_run(models):
    local, other = models["local"], models["nnsight"]
    assert local.backend == "local" and other.backend == "nnsight" and models["remote-local"].runner.remote == "local"
    plain = other.runner.hf
    embed = plain.get_input_embeddings().weight
    assert embed.data_ptr() == local.hf_model.get_input_embeddings().weight.data_ptr()  # no copy of the weights
    assert not any("_original_component" in name for name, _ in plain.named_modules())  # no bridge wrappers


def test_run_last_logits_and_cache(models, backend):
    local, other = models["local"], models[backend]
    batch = random_batch(local)
    names = _names(local)
    want, want_cache = run_last(local, batch, names=names)
    got, got_cache = run_last(other, batch, names=names)
    assert _diff(got, want) < TOL
    assert set(got_cache) == set(names)
    for name in names:
        assert _diff(got_cache[name], want_cache[name]) < TOL, name
    _, last = run_last(other, batch, names=names[:2], last_only=True)
    rows = torch.arange(len(batch))
    assert _diff(last[names[0]], want_cache[names[0]][rows, batch.last_pos]) < TOL


def test_restricted_logits_match_in_values_and_gaps(models, backend):
    local, other = models["local"], models[backend]
    batch, tokens = random_batch(local, seed=1), torch.tensor([4, 9, 30])
    want, _ = run_last(local, batch, tokens=tokens)
    got, _ = run_last(other, batch, tokens=tokens)
    assert torch.equal(got.isnan(), want.isnan()) and int(got.isnan().sum()) == got.numel() - 3 * len(batch)
    assert _diff(got[:, tokens], want[:, tokens]) < TOL
    resid = run_last(local, batch, names=[act_name("resid_pre", 1)])[1][act_name("resid_pre", 1)]
    want, _ = run_from_layer(local, resid, 1, batch.last_pos, tokens=tokens)
    got, _ = run_from_layer(other, resid, 1, batch.last_pos, tokens=tokens)
    assert torch.equal(got.isnan(), want.isnan()) and _diff(got[:, tokens], want[:, tokens]) < TOL
    # only the asked-for columns come back from the trace: a smaller request
    plan = nn_runner._plan(local, (), (), 0)
    assert nn_runner.request_bytes(local, batch.input_ids, plan, tokens=tokens) < nn_runner.request_bytes(
        local, batch.input_ids, plan)


def _edits(model, batch, source_cache, mode):
    """One edit of each component kind (a head, an MLP, the residual stream) in ``mode``."""
    n, d = len(batch), model.d_model
    g = torch.Generator().manual_seed(3)
    head, mlp, resid = Component("head", 1, 2), Component("mlp", 0), Component("resid", 2, position=3)
    if mode == "patch":
        return [Edit(c, "patch", source_cache[c.hook_name]) for c in (head, mlp, resid)]
    if mode == "mean":
        return [Edit(c, "mean", source_cache[c.hook_name].mean(0)) for c in (head, mlp, resid)]
    if mode == "zero":
        return [Edit(c, "zero") for c in (head, mlp, resid)]
    mask = torch.zeros(n, batch.input_ids.shape[1], dtype=torch.bool)
    mask[torch.arange(n), batch.last_pos] = True
    return [Edit(Component("mlp", 1), mode, torch.randn(d, generator=g) * 3, mask=mask),
            Edit(Component("resid", 2), mode, torch.randn(n, d, generator=g) * 3, mask=mask)]


@pytest.mark.parametrize("mode", ["patch", "mean", "zero", "add", "replace"])
def test_edits_agree(models, backend, mode):
    local, other = models["local"], models[backend]
    batch, source = random_batch(local), random_batch(local, seed=7)
    names = [act_name("z", 1), act_name("mlp_out", 0), act_name("resid_pre", 2)]
    _, source_cache = run_last(local, source, names=names)
    hooks = edit_hooks(_edits(local, batch, source_cache, mode))
    clean, _ = run_last(local, batch)
    want, want_cache = run_last(local, batch, fwd_hooks=hooks, names=[act_name("resid_post", 2)])
    got, got_cache = run_last(other, batch, fwd_hooks=hooks, names=[act_name("resid_post", 2)])
    assert _diff(want, clean) > 1e-3  # the edits change the output, so agreeing means something
    assert _diff(got, want) < TOL
    assert _diff(got_cache[act_name("resid_post", 2)], want_cache[act_name("resid_post", 2)]) < TOL


def test_run_from_layer(models, backend):
    local, other = models["local"], models[backend]
    batch = random_batch(local, seed=2)
    starts = layer_names("resid_pre", local.n_layers) + [act_name("final")]
    full, cache = run_last(local, batch, names=starts)
    hooks = edit_hooks([Edit(Component("mlp", local.n_layers - 1), "zero")])
    for layer, name in enumerate(starts):
        later = [act_name("resid_post", local.n_layers - 1)] if layer < local.n_layers else []
        want, want_cache = run_from_layer(local, cache[name], layer, batch.last_pos, names=later)
        got, got_cache = run_from_layer(other, cache[name], layer, batch.last_pos, names=later)
        assert _diff(want, full) < TOL and _diff(got, want) < TOL, layer
        for n in later:
            assert _diff(got_cache[n], want_cache[n]) < TOL
        edited_want, _ = run_from_layer(local, cache[name], layer, batch.last_pos, fwd_hooks=hooks)
        edited_got, _ = run_from_layer(other, cache[name], layer, batch.last_pos, fwd_hooks=hooks)
        assert _diff(edited_got, edited_want) < TOL
        if layer < local.n_layers:
            assert _diff(edited_want, want) > 1e-3


@pytest.mark.parametrize("family", ["gptj", "qwen2", "mistral", "gemma2"])
def test_the_other_mapped_families(family, tmp_path):
    """The module layouts of HF_PLACES beyond the three main families: cache, an edit and a run from a layer."""
    from mechbook.core.architectures import HF_PLACES

    local = mechbook.load_model(str(sharpen(build_tiny_model(family, tmp_path))))
    other = backends.use_backend(local, "nnsight")
    places = HF_PLACES[local.hf_model.config.model_type]
    names = [n for n in _names(local) if n == act_name("final") or n.split(".")[-1].removeprefix("hook_") in places
             or "resid_p" in n]
    batch = random_batch(local)
    want, want_cache = run_last(local, batch, names=names)
    got, got_cache = run_last(other, batch, names=names)
    assert _diff(got, want) < TOL and len(names) > 6 * local.n_layers
    for name in names:
        assert _diff(got_cache[name], want_cache[name]) < TOL, name
    hooks = edit_hooks([Edit(Component("head", 1, 0), "zero"), Edit(Component("mlp", 2), "zero")])
    edited, _ = run_last(local, batch, fwd_hooks=hooks)
    assert _diff(edited, want) > 1e-3 and _diff(run_last(other, batch, fwd_hooks=hooks)[0], edited) < TOL
    resid = want_cache[act_name("resid_pre", 1)]
    assert _diff(run_from_layer(other, resid, 1, batch.last_pos)[0], want) < TOL


def test_run_from_layer_refuses_names_before_it(models):
    other = models["nnsight"]
    batch = random_batch(other)
    _, cache = run_last(other, batch, names=[act_name("resid_pre", 1)])
    with pytest.raises(MechbookError, match="did not fire"):
        run_from_layer(other, cache[act_name("resid_pre", 1)], 1, batch.last_pos, names=[act_name("z", 0)])


def test_a_core_sweep_runs_unchanged_on_nnsight(models):
    """Patching and ablation run through run_from_layer / run_last, so they need no backend code of their own."""
    local, other = models["local"], models["nnsight"]
    case = head_patching_case(local, other)
    clean, corrupt, heads, metric = case.clean, case.corrupt, case.heads, case.metric
    assert (case.want.metric - case.unpatched).abs().max() > 1e-3  # the patches move the metric
    assert (case.got.metric - case.want.metric).abs().max() < TOL
    means = mean_activations(local, corrupt, heads)
    want_ablated = ablate(local, clean, heads, metric, means=means)
    assert _diff(want_ablated, metric(run_last(local, clean)[0])) > 1e-3
    assert _diff(ablate(other, clean, heads, metric, means=means), want_ablated) < TOL


def test_attention_patterns_are_refused_by_name(models):
    with pytest.raises(MechbookError, match="cannot reach 'pattern'.*backend='local'"):
        run_last(models["nnsight"], random_batch(models["local"]), names=[act_name("pattern", 0)])


# --- backend errors ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return mechbook.load_model(str(build_tiny_model("gpt2", tmp_path_factory.mktemp("backend-errors"))))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_ndif_without_a_key_fails_before_any_request(tiny, monkeypatch):
    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    from nnsight.intervention.backends.remote import RemoteBackend

    monkeypatch.setattr(RemoteBackend, "__call__", lambda *a, **k: pytest.fail("a request was sent"))
    with pytest.raises(MechbookError) as exc:
        backends.use_backend(tiny, "ndif")
    assert "export NDIF_API_KEY=" in _one_line(exc)


def test_ndif_runs_hub_models_only(tiny, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    with pytest.raises(MechbookError, match="is a local model: use backend='nnsight'") as exc:
        backends.use_backend(tiny, "ndif")
    _one_line(exc)


def test_ndif_with_a_key_sends_each_trace_remotely_by_hub_id(tiny, monkeypatch):
    """No network here: nnsight's remote backend is replaced by one that records the request and fails."""
    import dataclasses

    from nnsight.modeling.mixins.remotable import Remotable

    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    sent = []

    def fake_backend(self, remote, *args):
        sent.append((remote, self.repo_id))
        raise ConnectionError("no network in the tests")

    monkeypatch.setattr(Remotable, "_remote_backend", fake_backend)
    as_hub = dataclasses.replace(tiny, name="gpt2", source="hub")  # the tiny weights, posing as the hub's GPT-2
    with pytest.raises(ConnectionError):
        run_last(backends.use_backend(as_hub, "ndif"), random_batch(tiny))
    assert sent == [(True, "openai-community/gpt2")]  # the hub id NDIF serves GPT-2 under


def test_missing_nnsight_names_the_extra(tiny, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nnsight" else real(name, *a))
    for backend in ("nnsight", "ndif"):
        with pytest.raises(MechbookError) as exc:
            backends.use_backend(tiny, backend)
        assert "bash scripts/setup.sh" in _one_line(exc)


@pytest.mark.parametrize("backend, remote, match", [("gpu", False, "unknown backend"),
                                                    ("nnsight", True, "remote='local'"),
                                                    ("local", "local", "remote= applies")])
def test_bad_backend_arguments(tiny, backend, remote, match):
    with pytest.raises(MechbookError, match=match) as exc:
        backends.use_backend(tiny, backend, remote=remote)
    _one_line(exc)


def test_a_layout_nnsight_does_not_know_is_refused(tmp_path):
    bloom = mechbook.load_model(str(build_tiny_model("bloom", tmp_path)))
    with pytest.raises(MechbookError, match="does not know the module layout of 'bloom'") as exc:
        run_last(backends.use_backend(bloom, "nnsight"), random_batch(bloom))
    _one_line(exc)


# --- a real model -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", ["nnsight", "remote-local"])
def test_smollm2_parity(backend_name):
    local = mechbook.load_model("smollm2-135m")
    other = backends.use_backend(local, "nnsight", remote="local" if backend_name == "remote-local" else False)
    batch = tokenize(local, ["The capital of France is", "One, two, three,", "Yesterday I walked. Today I"])
    names = [act_name("z", 9), act_name("mlp_out", 20), act_name("resid_pre", 15), act_name("final")]
    want, want_cache = run_last(local, batch, names=names)
    got, got_cache = run_last(other, batch, names=names)
    assert _diff(got, want) < TOL
    for name in names:
        assert _diff(got_cache[name], want_cache[name]) < TOL, name
    hooks = edit_hooks([Edit(Component("head", 9, 3), "zero"), Edit(Component("mlp", 20), "mean",
                                                                         want_cache[act_name("mlp_out", 20)].mean(0))])
    edited_want, _ = run_last(local, batch, fwd_hooks=hooks)
    assert _diff(edited_want, want) > 1e-3
    assert _diff(run_last(other, batch, fwd_hooks=hooks)[0], edited_want) < TOL
    resid = want_cache[act_name("resid_pre", 15)]
    assert _diff(run_from_layer(other, resid, 15, batch.last_pos)[0], want) < TOL


def _posing_as(tiny, name):
    import dataclasses

    return dataclasses.replace(tiny, name=name, source="hub")  # the tiny weights, posing as a hub model


def test_ndif_refuses_a_model_it_does_not_serve(tiny, monkeypatch):
    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    with pytest.raises(MechbookError, match="NDIF does not serve 'bigscience/bloom-560m'; it serves gpt2") as exc:
        backends.use_backend(_posing_as(tiny, "bigscience/bloom-560m"), "ndif")
    _one_line(exc)


@pytest.mark.parametrize("reply, expected", [
    ("Failed to send request: client nnsight version 0.8.1 is not supported, the server runs 0.9.0",
     "NDIF refused this nnsight version (nnsight 0.8.1, pinned in pyproject.toml)"),
    ("Failed to send request: 503 Service Unavailable", "NDIF could not run the request: Failed to send request: 503"),
])
def test_ndif_errors_are_one_line_naming_the_fix(tiny, monkeypatch, reply, expected):
    """The server's refusals arrive as nnsight's RemoteError (faked here: no network)."""
    from nnsight.intervention.backends.remote import RemoteError
    from nnsight.modeling.mixins.remotable import Remotable

    def refusing_backend(self, remote, *args):
        raise RemoteError(reply)

    monkeypatch.setenv("NDIF_API_KEY", "test-key")
    monkeypatch.setattr(Remotable, "_remote_backend", refusing_backend)
    with pytest.raises(MechbookError) as exc:
        run_last(backends.use_backend(_posing_as(tiny, "gpt2"), "ndif"), random_batch(tiny))
    text = _one_line(exc)
    assert text.startswith(expected)
    if "version" in reply:
        assert "update the nnsight pin in pyproject.toml" in text and text.endswith(
            "bash scripts/lock.sh --upgrade-package nnsight && bash scripts/setup.sh")


def test_a_request_over_the_cap_is_split_without_edits_and_refused_with_them(tiny, monkeypatch):
    """remote='local' goes through the remote path's size check; a 3-prompt batch is over a 1-prompt cap."""
    local, remote = tiny, backends.use_backend(tiny, "nnsight", remote="local")
    batch = random_batch(tiny)
    names = [act_name("resid_post", 0), act_name("z", 1)]
    plan = nn_runner._plan(local, (), names, 0)
    one = nn_runner.request_bytes(local, batch.select(slice(0, 1)).input_ids, plan, last_only=True)
    assert nn_runner.request_bytes(local, batch.input_ids, plan, last_only=True) > one
    monkeypatch.setattr(nn_runner, "MAX_REQUEST_BYTES", one)
    want_logits, want = run_last(local, batch, names=names, last_only=True)
    logits, cache = run_last(remote, batch, names=names, last_only=True)
    assert remote.runner.traces == 3  # split in halves until each request fits: [0] [1 2] -> [1] [2]
    assert _diff(logits, want_logits) < TOL and all(_diff(cache[n], want[n]) < TOL for n in names)
    zero = [(act_name("z", 0), lambda z, hook: z * 0)]
    with pytest.raises(MechbookError, match="over mechbook's cap of .* run fewer prompts at once") as exc:
        run_last(remote, batch, fwd_hooks=zero)
    _one_line(exc)
    resid = torch.zeros(len(batch), batch.input_ids.shape[1], tiny.d_model)
    with pytest.raises(MechbookError, match="one request to NDIF would carry about"):
        run_from_layer(remote, resid, 1, batch.last_pos)
    # the in-process nnsight backend sends nothing anywhere: no cap
    run_last(backends.use_backend(tiny, "nnsight"), batch, fwd_hooks=zero)
