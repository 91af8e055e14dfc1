"""Circuit discovery (Paper B): node pruning, path patching through q/k/v, runs from a layer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mechbook
from conftest import build_tiny_model, random_circuit_task
from mechbook import MechbookError
from mechbook.core.circuits import (
    Circuit,
    Edge,
    circuit_edges,
    cross_task_scores,
    patch_head_outputs_fast,
    patch_paths,
    prune_edges,
    prune_nodes,
    random_circuits,
    run_from_layer,
    score_circuit,
)
from mechbook.core.runs import run_last, temporary_hooks, tokenize
from mechbook.core.patching import Component, logit_diff, patch_head_outputs

PAPER_DATA = Path(mechbook.__file__).parent / "papers" / "seqcont" / "data"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls on a shared, loaded CPU are ~1000x slower with two spinning threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tiny models with sharp attention -------------------------------------------------------------
# Randomly initialised tiny models attend almost uniformly, so q and k paths barely matter; scaling
# the query/key maps gives every edge a measurable effect.


def _sharpen(directory: Path, factor: float = 8.0) -> Path:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    d = model.config.hidden_size
    params = dict(model.named_parameters())
    qk_norm = any(name.endswith("q_norm.weight") for name in params)  # Gemma 3 normalises q and k per head
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("c_attn.weight"):  # GPT-2 Conv1D [d_model, 3 d_model]: q | k | v
                p[:, : 2 * d] *= factor
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Gemma RMSNorm scales by (1 + w)
                p.fill_(factor - 1.0)
            elif name.endswith(("q_proj.weight", "k_proj.weight")) and not qk_norm:
                p *= factor
    model.save_pretrained(directory)
    return directory


def _mha_twin(directory: Path, out: Path) -> Path:
    """The same function as a grouped-query model, with every key/value head duplicated per query head."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    cfg = AutoConfig.from_pretrained(directory)
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    cfg.num_key_value_heads = n_heads
    twin = AutoModelForCausalLM.from_config(cfg)
    state = model.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = w.view(n_kv, d_head, -1).repeat_interleave(n_heads // n_kv, dim=0).reshape(n_heads * d_head, -1)
    twin.load_state_dict(state)
    twin.save_pretrained(out)
    for f in directory.iterdir():
        if "token" in f.name or f.name == "special_tokens_map.json":
            shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def sharp(request, tmp_path_factory):
    directory = build_tiny_model(request.param, tmp_path_factory.mktemp(f"sharp-{request.param}"))
    return mechbook.load_model(str(_sharpen(directory)))


@pytest.fixture(scope="module")
def sharp_gpt2(tmp_path_factory):
    return mechbook.load_model(str(_sharpen(build_tiny_model("gpt2", tmp_path_factory.mktemp("sharp-gpt2-only")))))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def gqa_pair(request, tmp_path_factory):
    """A sharpened grouped-query tiny model and its multi-head twin (same function)."""
    gqa = _sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"gqa-{request.param}")))
    twin = _mha_twin(gqa, tmp_path_factory.mktemp(f"twin-{request.param}"))
    return mechbook.load_model(str(gqa)), mechbook.load_model(str(twin))


# --- run_from_layer --------------------------------------------------------------------------------


def _check_run_from_layer(model, layers):
    batch = tokenize(model, ["one two three four five six seven eight nine ten January", "1 2 3 4", "Today I walk."])
    names = [f"blocks.{l}.hook_resid_pre" for l in range(model.n_layers)]
    full, cache = run_last(model, batch, names=names)
    for layer in layers:
        resid = cache[names[layer]] if layer < model.n_layers else None
        if resid is None:  # from the end: only the final norm and unembedding
            _, end = run_last(model, batch, names=["ln_final.hook_in"])
            resid = end["ln_final.hook_in"]
        logits, _ = run_from_layer(model, resid, layer, batch.last_pos)
        assert torch.equal(logits, full), (model.name, layer, (logits - full).abs().max())


def test_run_from_layer_equals_full_forward(tiny_model):
    _check_run_from_layer(tiny_model, range(tiny_model.n_layers + 1))


@pytest.mark.slow
def test_run_from_layer_equals_full_forward_gemma(gemma):
    _check_run_from_layer(gemma, [0, 1, 5, 6, 11, 17])


@pytest.mark.slow
def test_patch_head_outputs_fast_gemma(gemma):
    """Numerals prompts and their shuffles share a prefix ("<bos>Van done in"): the prefix cache on the real model."""
    clean = tokenize(gemma, ["Van done in 1. Hat done in 2. Ring done in 3. Sun done in",
                             "Oil done in 4. Cup done in 5. Box done in 6. Pen done in"])
    corrupted = tokenize(gemma, ["Van done in 3. Hat done in 1. Ring done in 2. Sun done in",
                                 "Oil done in 6. Cup done in 4. Box done in 5. Pen done in"])
    answers = torch.tensor([gemma.tokenizer.convert_tokens_to_ids(t) for t in ("4", "7")]), \
        torch.tensor([gemma.tokenizer.convert_tokens_to_ids(t) for t in ("3", "6")])
    metric = logit_diff(*answers)
    heads = [Component("head", l, h) for l in (0, 8, 17) for h in range(gemma.n_heads)]
    slow = patch_head_outputs(gemma, clean, corrupted, metric, heads=heads)
    fast = patch_head_outputs_fast(gemma, clean, corrupted, metric, heads=heads, tokens=torch.cat(answers))
    assert (fast.metric - slow.metric).abs().max() < 1e-4


def test_run_from_layer_hooks_and_cache(tiny_model):
    batch = tokenize(tiny_model, ["1 2 3 4 5", "one two three"])
    _, cache = run_last(tiny_model, batch, names=["blocks.1.hook_resid_pre", "blocks.2.attn.hook_z"])
    fired = []
    hooks = [("blocks.0.attn.hook_z", lambda a, hook: fired.append(0)),
             ("blocks.2.attn.hook_z", lambda a, hook: fired.append(2))]
    _, got = run_from_layer(tiny_model, cache["blocks.1.hook_resid_pre"], 1, batch.last_pos, fwd_hooks=hooks,
                            names=["blocks.2.attn.hook_z"])
    assert fired == [2]
    assert torch.allclose(got["blocks.2.attn.hook_z"], cache["blocks.2.attn.hook_z"], atol=1e-6)
    with pytest.raises(MechbookError, match="before layer 1"):
        run_from_layer(tiny_model, cache["blocks.1.hook_resid_pre"], 1, batch.last_pos, names=["blocks.0.attn.hook_z"])
    with pytest.raises(MechbookError, match="out of range"):
        run_from_layer(tiny_model, cache["blocks.1.hook_resid_pre"], 7, batch.last_pos)


def test_patch_head_outputs_fast_equals_patch_head_outputs(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    slow = patch_head_outputs(sharp, clean, corrupted, metric)
    fast = patch_head_outputs_fast(sharp, clean, corrupted, metric, max_rows=16)  # several passes per layer
    assert list(fast.component) == list(slow.component)
    assert (fast.metric - slow.metric).abs().max() < 1e-5


@pytest.mark.parametrize("shared", [5, 8])
def test_patch_head_outputs_fast_with_a_shared_prefix(sharp, shared):
    """Prompts of several lengths whose first ``shared`` tokens agree: the prefix is computed once, results unchanged."""
    g = torch.Generator().manual_seed(2)
    lengths = [12, 12, 10, 11, 12, 9]
    clean = [torch.randint(3, 300, (n,), generator=g) for n in lengths]
    corrupted = [torch.cat([row[:shared], row[shared:][torch.randperm(len(row) - shared, generator=g)]]) for row in clean]
    clean, corrupted = tokenize(sharp, [r.tolist() for r in clean]), tokenize(sharp, [r.tolist() for r in corrupted])
    logits = run_last(sharp, clean)[0]
    ranked = logits.argsort(-1, descending=True)
    answers = (ranked[:, 0], ranked[:, 7])
    metric = logit_diff(*answers)
    slow = patch_head_outputs(sharp, clean, corrupted, metric)
    fast = patch_head_outputs_fast(sharp, clean, corrupted, metric, max_rows=12)
    cheap = patch_head_outputs_fast(sharp, clean, corrupted, metric, tokens=torch.cat(answers).unique())
    assert (fast.metric - slow.metric).abs().max() < 1e-5
    assert (cheap.metric - slow.metric).abs().max() < 1e-5
    assert (slow.metric - slow.metric.mean()).abs().max() > 1e-3


def test_patch_head_outputs_fast_refuses_a_prefix_cache_the_attention_never_saw(sharp, monkeypatch):
    """If the installed transformers/transformer-lens drop the cache keyword, the run fails instead of lying."""
    from mechbook.core import circuits

    g = torch.Generator().manual_seed(3)
    clean = [torch.randint(3, 300, (10,), generator=g) for _ in range(3)]
    corrupted = [torch.cat([row[:6], row[6:][torch.randperm(4, generator=g)]]) for row in clean]
    clean, corrupted = tokenize(sharp, [r.tolist() for r in clean]), tokenize(sharp, [r.tolist() for r in corrupted])
    metric = logit_diff(torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10]))
    monkeypatch.setattr(circuits, "_cache_kwargs", lambda prefix: {})  # as if the keyword were filtered out
    with pytest.raises(MechbookError, match="did not reach the attention of layer"):
        patch_head_outputs_fast(sharp, clean, corrupted, metric)


def test_run_from_layer_tokens_restricts_the_logits(tiny_model):
    batch = tokenize(tiny_model, ["1 2 3 4 5", "one two three"])
    full, cache = run_last(tiny_model, batch, names=["blocks.1.hook_resid_pre"])
    tokens = torch.tensor([5, 17, 42])
    part, _ = run_from_layer(tiny_model, cache["blocks.1.hook_resid_pre"], 1, batch.last_pos, tokens=tokens)
    assert torch.allclose(part[:, tokens], full[:, tokens], atol=1e-5)
    assert part.isnan().sum() == part.numel() - 2 * len(tokens)


# --- circuits, scores, files -----------------------------------------------------------------------------


def test_circuit_save_load_round_trip(tmp_path, tiny_gpt2):
    circuit = Circuit(heads=[(4, 4), (0, 1), (4, 4)], mlps=[3, 0], score=81.0)
    assert circuit.heads == [(0, 1), (4, 4)] and circuit.mlps == [0, 3]
    path = circuit.save(tmp_path / "c.json")
    assert json.loads(path.read_text()) == {"heads": [[0, 1], [4, 4]], "mlps": [0, 3]}
    assert Circuit.load(path) == circuit

    paper = Circuit.load(PAPER_DATA / "numerals_gpt2small_circuit.json")
    assert len(paper.heads) == 14 and (9, 1) in paper.heads and paper.mlps == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert paper.labels()[:2] == ["0.1", "1.5"]
    again = paper.save(tmp_path / "p.json")
    assert json.loads(again.read_text()) == json.loads((PAPER_DATA / "numerals_gpt2small_circuit.json").read_text())

    with pytest.raises(MechbookError, match="does not fit"):
        paper.validate(tiny_gpt2)  # GPT-2 small's head 4.10 is not in a 3-layer, 4-head model
    (tmp_path / "bad.json").write_text('{"heads": [[0, 1]]}')
    with pytest.raises(MechbookError, match="could not read a circuit"):
        Circuit.load(tmp_path / "bad.json")
    with pytest.raises(MechbookError, match="layer, head"):
        Circuit(heads=[1, 2], mlps=[])


def test_score_circuit_and_random_control(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    assert score_circuit(sharp, clean, Circuit.full(sharp), means, metric) == pytest.approx(100.0, abs=1e-4)
    empty = score_circuit(sharp, clean, Circuit([], []), means, metric)
    assert empty != pytest.approx(100.0, abs=1e-2)

    like = Circuit([(0, 1), (1, 2), (2, 3)], [0])
    randoms = random_circuits(sharp, size_like=like, n=5, seed=3)
    assert all(len(r.heads) == 3 and len(r.mlps) == 1 for r in randoms)
    assert [r.heads for r in randoms] == [r.heads for r in random_circuits(sharp, size_like=like, n=5, seed=3)]
    assert len({tuple(r.heads) for r in randoms}) > 1

    table = cross_task_scores(sharp, {"found": like, "all": Circuit.full(sharp)}, {"task": (clean, means, metric)})
    assert list(table.columns[:3]) == ["circuit", "task", "score"] and len(table) == 2
    assert table.set_index("circuit").score["all"] == pytest.approx(100.0, abs=1e-4)


# --- node pruning ------------------------------------------------------------------------------------------


def _sequential_reference(model, batch, means, metric, threshold):
    """The paper's loop, literally: one full forward per tentative removal."""
    circuit = Circuit.full(model)
    decisions = []
    while True:
        changed = {}
        for direction in ("backward", "forward"):
            changed[direction] = False
            layers = range(model.n_layers - 1, -1, -1) if direction == "backward" else range(model.n_layers)
            for layer in layers:
                heads = [Component("head", layer, h) for h in range(model.n_heads)]
                order = [Component("mlp", layer), *heads] if direction == "backward" else [*heads, Component("mlp", layer)]
                for c in order:
                    if c not in circuit:
                        continue
                    without = Circuit.from_components(x for x in circuit.components if x != c)
                    score = score_circuit(model, batch, without, means, metric)
                    removed = (100 - score) < 100 * threshold
                    decisions.append((direction, c.label, removed))
                    if removed:
                        circuit, changed[direction] = without, True
            if not changed[direction]:
                break
        if not all(changed.values()):
            return circuit, decisions


@pytest.mark.parametrize("threshold", [0.1, 0.3])
def test_prune_nodes_matches_the_papers_sequential_loop(sharp, threshold):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    found = prune_nodes(sharp, clean, means, metric, threshold=threshold)
    reference, decisions = _sequential_reference(sharp, clean, means, metric, threshold)
    log = found.log
    assert list(zip(log["pass"], log.component, log.removed)) == decisions
    assert found == reference
    assert found.score == pytest.approx(score_circuit(sharp, clean, found, means, metric), abs=1e-3)
    # fewer forward passes than one per decision, even counting refreshes
    assert log.attrs["forward_passes"] <= len(log) + 1
    cheap = prune_nodes(sharp, clean, means, metric, threshold=threshold, tokens=metric.answer_ids)
    assert cheap == found and (cheap.log.score_without - log.score_without).abs().max() < 1e-3


def test_prune_nodes_decision_log_is_complete(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp, seed=1)
    found = prune_nodes(sharp, clean, means, metric, threshold=0.3)
    log = found.log
    assert list(log.columns) == ["round", "pass", "step", "component", "kind", "layer", "head", "score_without",
                                 "removed", "circuit_size"]
    assert list(log.step) == list(range(1, len(log) + 1))
    assert (log.removed == (100 - log.score_without < 30.0)).all()
    # every pass visits every component still in the circuit when the pass starts, in the paper's order
    alive = set(Circuit.full(sharp).labels())
    for (_, direction), visits in log.groupby(["round", "pass"], sort=False):
        assert set(visits.component) == alive
        layers = list(visits.layer)
        assert layers == sorted(layers, reverse=direction == "backward")
        alive -= set(visits.component[visits.removed])
    assert set(found.labels()) == alive
    assert len(found) > 0 and not visits.removed.any()  # the loop stops after a pass without removals
    assert list(log.circuit_size)[-1] == len(found)


def test_prune_nodes_max_rounds_and_start(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    one = prune_nodes(sharp, clean, means, metric, threshold=0.3, max_rounds=1)
    assert set(one.log["round"]) == {1}
    start = Circuit([(l, h) for l in range(sharp.n_layers) for h in range(2)], list(range(sharp.n_layers)))
    sub = prune_nodes(sharp, clean, means, metric, threshold=0.3, start=start)
    assert set(sub.labels()) <= set(start.labels())
    assert set(sub.log.component[sub.log["round"] == 1]) <= set(start.labels())


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, 20, True, "0.2", None])
def test_threshold_validation(tiny_gpt2, bad):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    with pytest.raises(MechbookError, match=r"fraction in \(0, 1\]"):
        prune_nodes(tiny_gpt2, clean, means, metric, threshold=bad)
    with pytest.raises(MechbookError, match=r"fraction in \(0, 1\]"):
        prune_edges(tiny_gpt2, clean, Circuit.full(tiny_gpt2), means, metric, threshold=bad)


def test_prune_nodes_needs_a_positive_full_metric(tiny_gpt2):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    with pytest.raises(MechbookError, match="not positive"):
        prune_nodes(tiny_gpt2, clean, means, lambda logits: -metric(logits))


# --- path patching -----------------------------------------------------------------------------------------


def _tl_direct_path(model, clean, corrupted, metric, src, component):
    from transformer_lens import patching

    def z_only(name):
        return name.endswith("attn.hook_z")

    with torch.no_grad():  # transformer-lens multiplies cached tensors with weights that require grad
        _, clean_cache = model.bridge.run_with_cache(clean.input_ids, names_filter=z_only)
        _, corrupted_cache = model.bridge.run_with_cache(corrupted.input_ids, names_filter=z_only)
        return patching.get_act_patch_direct_path(
            model.bridge, corrupted.input_ids, clean_cache, corrupted_cache, lambda logits: metric(logits[:, -1]).mean(),
            src[0], src[1], component=component, verbose=False,
        )


def _ours(model, clean, corrupted, metric, src, component):
    sender = Component("head", *src)
    edges = [Edge(sender, Component("head", l, h), component)
             for l in range(src[0] + 1, model.n_layers) for h in range(model.n_heads)]
    got = patch_paths(model, corrupted, edges, metric, source=clean, max_rows=20).mean(1)
    grid = torch.zeros(model.n_layers, model.n_heads)
    for e, value in zip(edges, got):
        grid[e.receiver.layer, e.receiver.head] = value
    return grid


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_patch_paths_equals_transformer_lens_direct_path(sharp_gpt2, component):
    clean, corrupted, means, metric = random_circuit_task(sharp_gpt2)
    unpatched = float(metric(run_last(sharp_gpt2, corrupted)[0]).mean())
    effect = 0.0
    for src in [(0, 1), (1, 3)]:
        expected = _tl_direct_path(sharp_gpt2, clean, corrupted, metric, src, component)
        got = _ours(sharp_gpt2, clean, corrupted, metric, src, component)
        assert (got - expected).abs().max() < 2e-5, (src, got, expected)
        effect = max(effect, float((expected[src[0] + 1 :] - unpatched).abs().max()))
    assert effect > 1e-3  # the paths matter (50x the tolerance): the check has teeth


@pytest.fixture(scope="module")
def smollm():
    return mechbook.load_model("smollm2-135m")


@pytest.mark.slow
def test_patch_paths_equals_transformer_lens_on_smollm2_queries(smollm):
    """A real grouped-query model (9 heads, 3 key/value heads): q paths, where transformer-lens applies."""
    clean, corrupted, means, metric = random_circuit_task(smollm, n_prompts=4, length=8)
    src = (24, 3)
    expected = _tl_direct_path(smollm, clean, corrupted, metric, src, "q")
    got = _ours(smollm, clean, corrupted, metric, src, "q")
    assert (got - expected).abs().max() < 1e-4


def test_patch_paths_gqa_equals_transformer_lens_on_the_multi_head_twin(gqa_pair):
    """Per-query-head k/v edges of a grouped-query model = transformer-lens on the same model with k/v heads unshared."""
    gqa, twin = gqa_pair
    clean, corrupted, means, metric = random_circuit_task(gqa)
    unpatched = float(metric(run_last(gqa, corrupted)[0]).mean())
    if gqa.hf_model.config.model_type == "llama":
        for component in ["q", "k", "v"]:
            expected = _tl_direct_path(twin, clean, corrupted, metric, (0, 2), component)
            got = _ours(gqa, clean, corrupted, metric, (0, 2), component)
            assert (got - expected).abs().max() < 2e-5, (component, got, expected)
            assert (expected[1:] - unpatched).abs().max() > 1e-3
    else:  # Gemma 3: transformer-lens refuses (post-attention norm); use its per-head q/k/v input fork directly
        for component in ["q", "k", "v"]:
            expected = _forked_reference(twin, clean, corrupted, metric, (0, 2), component)
            got = _ours(gqa, clean, corrupted, metric, (0, 2), component)
            assert (got - expected).abs().max() < 2e-5, (component, got, expected)
            assert (expected[1:] - unpatched).abs().max() > 1e-3


def _forked_reference(model, clean, corrupted, metric, src, component):
    """Direct path patching by hand on a multi-head model: the residual change from swapping the sender's z
    (measured as the change of ``hook_resid_mid``) added to one head's pre-norm q/k/v input copy."""
    from transformer_lens.patching import _split_qkv_input

    z_name, mid = f"blocks.{src[0]}.attn.hook_z", f"blocks.{src[0]}.hook_resid_mid"
    _, clean_z = run_last(model, clean, names=[z_name])

    def swap(z, hook):
        z = z.clone()
        z[:, :, src[1]] = clean_z[z_name][:, :, src[1]]
        return z

    _, base = run_last(model, corrupted, names=[mid])
    _, swapped = run_last(model, corrupted, names=[mid], fwd_hooks=[(z_name, swap)])
    delta = swapped[mid] - base[mid]
    grid = torch.zeros(model.n_layers, model.n_heads)
    with _split_qkv_input(model.bridge):
        for layer in range(src[0] + 1, model.n_layers):
            for head in range(model.n_heads):
                def add(x, hook, head=head):
                    x = x.clone()
                    x[:, :, head] += delta
                    return x

                logits, _ = run_last(model, corrupted, fwd_hooks=[(f"blocks.{layer}.attn.hook_{component}_input", add)])
                grid[layer, head] = metric(logits).mean()
    return grid


@pytest.mark.parametrize("component", ["q", "k", "v"])
def test_gqa_edge_changes_only_its_receiver_head(gqa_pair, component):
    """A k/v edge recomputes the shared key/value head, but only the receiver's output may change.

    Observed around the patch: ``hook_z`` as the attention computed it (before the other
    heads of the group are given back their outputs) and the attention output after the
    output projection, which must equal the projection of the unpatched heads plus the
    receiver's patched one.
    """
    model, _ = gqa_pair
    clean, corrupted, means, metric = random_circuit_task(model)
    receiver = Component("head", 1, 0)  # shares its key/value head with head 1 (and 2, 3 on Gemma's single group)
    edge = Edge(Component("head", 0, 2), receiver, component)
    z_name, out_name = "blocks.1.attn.hook_z", "blocks.1.attn.hook_out"
    _, base = run_last(model, corrupted, names=[z_name])
    seen = {}
    observe = [(name, lambda act, hook, name=name: seen.__setitem__(name, act.detach().clone())) for name in (z_name, out_name)]
    with temporary_hooks(model, observe):
        patch_paths(model, corrupted, [edge], metric, source=clean)
    raw = seen[z_name]
    assert (raw[:, :, 0] - base[z_name][:, :, 0]).abs().max() > 1e-4  # the receiver is patched
    if component != "q":
        assert (raw[:, :, 1] - base[z_name][:, :, 1]).abs().max() > 1e-4  # the shared k/v moved its group mate too...
    expected = base[z_name].clone()
    expected[:, :, 0] = raw[:, :, 0]
    with torch.inference_mode():
        projected = model.bridge.blocks[1].attn.o.original_component(expected.flatten(-2))
    assert torch.allclose(seen[out_name], projected, atol=1e-6)  # ...but only the receiver's output goes on


def test_patch_paths_identity_and_mlp_senders(sharp):
    """Patching a sender with its own value changes nothing; MLP senders and mean ablation run."""
    clean, corrupted, means, metric = random_circuit_task(sharp)
    unpatched = metric(run_last(sharp, clean)[0])
    edges = [Edge(Component("head", 0, 1), Component("head", 2, 3), x) for x in "qkv"]
    edges += [Edge(Component("mlp", 0), Component("head", 1, 0), x) for x in "qkv"]
    same = patch_paths(sharp, clean, edges, metric, source=clean)
    assert torch.allclose(same, unpatched.expand_as(same), atol=1e-5)
    mean_ablated = patch_paths(sharp, clean, edges, metric, means=means)
    assert mean_ablated.shape == (6, len(clean)) and not torch.allclose(mean_ablated, same, atol=1e-4)
    with pytest.raises(MechbookError, match="earlier layer"):
        Edge(Component("head", 2, 0), Component("head", 1, 0), "q")
    with pytest.raises(MechbookError, match="'q', 'k' or 'v'"):
        Edge(Component("head", 0, 0), Component("head", 1, 0), "z")
    with pytest.raises(MechbookError, match="source= .* or means="):
        patch_paths(sharp, clean, edges, metric)


def test_prune_edges(sharp):
    clean, corrupted, means, metric = random_circuit_task(sharp)
    circuit = Circuit([(0, 0), (0, 1), (1, 2), (2, 3)], [0, 1, 2])
    edges = prune_edges(sharp, clean, circuit, means, metric, threshold=0.8)
    cheap = prune_edges(sharp, clean, circuit, means, metric, threshold=0.8, tokens=metric.answer_ids)
    assert (cheap.score_without - edges.score_without).abs().max() < 1e-3
    assert len(edges) == len(circuit_edges(sharp, circuit)) == 3 * (2 + 3)  # (1.2 <- 0.x) + (2.3 <- 0.x, 1.2), x q/k/v
    assert (edges.kept == (edges.score_without < 80.0)).all()
    assert edges.attrs["circuit_score"] == pytest.approx(score_circuit(sharp, clean, circuit, means, metric))
    patched = prune_edges(sharp, clean, circuit, means, metric, source=corrupted, mlp_senders=True, inputs=("v",))
    assert set(patched.input) == {"v"} and "mlp" in set(patched.sender_kind)
