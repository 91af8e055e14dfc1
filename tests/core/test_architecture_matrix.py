"""The architecture matrix: every public core entry point on nine families, against plain torch hooks.

Each family is a tiny config-built model (tests/conftest.py), its attention sharpened
so that every path matters. The reference side (tests/reference.py) loads the same
folder with ``AutoModelForCausalLM`` and computes each quantity with one full forward
per variant and hooks on the transformers modules; mechbook loads it through the
transformer-lens bridge and its batched, run-from-a-layer engine. All agree within 1e-4.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import mechbook
from conftest import ARCHITECTURES, build_tiny_model, sharpen
from mechbook.core import decoding
from mechbook.core.circuits import Circuit, circuit_means, prune_nodes, score_circuit
from mechbook.core.names import Component, act_name, inside_mlp, layer_names
from mechbook.core.path_patching import Edge, patch_paths
from mechbook.core.patching import ablate, logit_diff, patch_head_outputs, patch_mlp_outputs, patch_residual
from mechbook.core.runs import run_from_layer, run_last, tokenize
from mechbook.papers.vector_arithmetic.ffn_removal import logits_without_top_mlps
from mechbook.papers.vector_arithmetic.transplant import Transplant, transplant_logits
from reference import Ref, ablation_makers, complement, literal_node_pruning, means_over

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


@pytest.fixture(scope="module", params=ARCHITECTURES)
def pair(request, tmp_path_factory):
    directory = sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"matrix-{request.param}")))
    return mechbook.load_model(str(directory)), Ref(directory)


def _prompts(seed: int, lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths]


def _task(model, ref, seed=0, lengths=(9, 9, 7, 8), shared=3):
    """Clean prompts, corrupted twins (shuffled after the first ``shared`` tokens), a logit-difference metric."""
    g = torch.Generator().manual_seed(seed)
    clean = [torch.randint(3, 300, (n,), generator=g) for n in lengths]
    corrupt = [torch.cat([r[:shared], r[shared:][torch.randperm(len(r) - shared, generator=g)]]) for r in clean]
    clean_b, corrupt_b = tokenize(model, [r.tolist() for r in clean]), tokenize(model, [r.tolist() for r in corrupt])
    ranked = ref.logits(clean_b.input_ids, clean_b.lengths).argsort(-1, descending=True)
    metric = logit_diff(ranked[:, 0], ranked[:, 5])
    return clean_b, corrupt_b, metric


def test_logit_lens(pair):
    model, ref = pair
    batch = tokenize(model, _prompts(1, (8, 6, 9)))
    names = layer_names("resid_post", model.n_layers)
    _, cache = run_last(model, batch, names=names, last_only=True)
    targets = {"a": torch.tensor([5, 6, 7]), "b": torch.tensor([10, 11, 12])}
    lens = decoding.logit_lens(model, decoding.stack_layers(cache, names), targets)
    store = ref.cache(batch.input_ids)
    rows = torch.arange(len(batch))
    for layer in range(model.n_layers):
        logits = ref.lens(store[("resid_post", layer)][rows, batch.last_pos])
        probs = logits.softmax(-1)
        for name, ids in targets.items():
            got = lens[(lens.layer == layer) & (lens.target == name)].sort_values("prompt")
            want_p = probs[rows, ids]
            want_rank = (logits >= logits[rows, ids][:, None]).sum(-1)  # ties count against the target
            assert (torch.tensor(got.prob.to_numpy()) - want_p).abs().max() < TOL
            assert got["rank"].tolist() == want_rank.tolist()


def test_run_from_layer(pair):
    model, ref = pair
    batch = tokenize(model, _prompts(2, (11, 4, 7)))
    want = ref.logits(batch.input_ids, batch.lengths)
    names = layer_names("resid_pre", model.n_layers)
    _, cache = run_last(model, batch, names=names)
    for layer in range(model.n_layers):
        got, _ = run_from_layer(model, cache[names[layer]], layer, batch.last_pos)
        assert (got - want).abs().max() < TOL, layer


def test_head_patching_with_a_shared_prefix(pair):
    model, ref = pair
    clean, corrupt, metric = _task(model, ref)
    got = patch_head_outputs(model, clean, corrupt, metric, max_rows=8)  # several passes per layer
    src = ref.cache(clean.input_ids)
    for row in got.itertuples():
        def put(z, l=row.layer, h=row.head):
            z[:, :, h] = src[("z", l)][:, :, h]
            return z
        want = metric(ref.logits(corrupt.input_ids, corrupt.lengths, [ref.edit_z(row.layer, put)])).mean()
        assert abs(row.metric - float(want)) < TOL, row.component
    assert got.metric.std() > 1e-3  # the patches do something


def test_mlp_and_residual_patching(pair):
    model, ref = pair
    clean, corrupt, metric = _task(model, ref, seed=3, lengths=(8, 8, 8), shared=2)
    src = ref.cache(clean.input_ids)
    mlps = patch_mlp_outputs(model, clean, corrupt, metric)
    for row in mlps.itertuples():
        want = metric(ref.logits(corrupt.input_ids, corrupt.lengths,
                                 [ref.edit_mlp(row.layer, lambda x, l=row.layer: src[("mlp", l)].clone())])).mean()
        assert abs(row.metric - float(want)) < TOL, row.component
    resid = patch_residual(model, clean, corrupt, metric, layers=[0, model.n_layers - 1])
    for row in resid.itertuples():
        def put(x, l=row.layer, p=row.position):
            x[:, p] = src[("resid_pre", l)][:, p]
            return x
        want = metric(ref.logits(corrupt.input_ids, corrupt.lengths, [ref.edit_resid_pre(row.layer, put)])).mean()
        assert abs(row.metric - float(want)) < TOL, (row.component, row.position)


def test_mean_ablation_and_node_pruning(pair):
    model, ref = pair
    clean, corrupt, metric = _task(model, ref, seed=4, lengths=(8, 8, 8, 8), shared=1)
    means = circuit_means(model, corrupt)
    ref_means = means_over(ref, corrupt.input_ids, corrupt.lengths)
    full = float(metric(ref.logits(clean.input_ids, clean.lengths)).mean())

    def ref_score(heads, mlps):
        gone_h, gone_m = complement(ref, heads, mlps)
        logits = ref.logits(clean.input_ids, clean.lengths, ablation_makers(ref, ref_means, gone_h, gone_m))
        return 100.0 * float(metric(logits).mean()) / full

    some = [Component("head", 0, 1), Component("head", model.n_layers - 1, 2), Component("mlp", 1)]
    got = ablate(model, clean, some, metric, means=means)
    want = metric(ref.logits(clean.input_ids, clean.lengths,
                             ablation_makers(ref, ref_means, [(0, 1), (model.n_layers - 1, 2)], [1])))
    assert (got - want).abs().max() < TOL

    # the full model's metric can be small on a random model: keep the threshold where some nodes go and some stay
    circuit = prune_nodes(model, clean, means, metric, threshold=0.3, max_rows=8)
    heads, mlps, log = literal_node_pruning(ref_score, model.n_layers, model.n_heads, threshold=0.3)
    assert circuit.heads == sorted(heads) and circuit.mlps == sorted(mlps)
    assert len(circuit.log) == len(log)
    # scores are percent of the full model's metric: compare the metric itself
    assert max(abs(a - b[2]) * abs(full) / 100 for a, b in zip(circuit.log.score_without, log)) < TOL
    assert circuit.log.removed.tolist() == [r for *_, r in log]
    assert abs(score_circuit(model, clean, circuit, means, metric) - ref_score(heads, mlps)) * abs(full) / 100 < TOL



def test_a_node_pruning_rechecks_from_its_log_and_resumes_from_a_checkpoint(pair, tmp_path, monkeypatch):
    """Every decision recomputed alone agrees with the log; a run resumed half-way ends with the same log."""
    from mechbook.core import circuits
    from mechbook.core.pruning_checks import assert_agrees, check_node_decisions

    model, ref = pair
    clean, corrupt, metric = _task(model, ref, seed=4, lengths=(8, 8, 8, 8), shared=1)
    means = circuit_means(model, corrupt)
    versions = []
    write = circuits.write_atomically
    monkeypatch.setattr(circuits, "write_atomically", lambda path, text: (versions.append(text), write(path, text)))
    path = tmp_path / "prune.json"
    circuit = prune_nodes(model, clean, means, metric, threshold=0.3, max_rows=8, checkpoint=path)
    table = check_node_decisions(model, clean, means, metric, circuit, threshold=0.3, sample="all", max_rows=8)
    assert "differs" not in set(table.status) and (table.check == "score_without").sum() == len(circuit.log)
    assert_agrees(table)
    path.write_text(versions[len(versions) // 2])
    resumed = prune_nodes(model, clean, means, metric, threshold=0.3, max_rows=8, checkpoint=path)
    assert resumed == circuit and resumed.log.equals(circuit.log) and resumed.score == circuit.score


def test_overwritten_mlps_are_not_computed(pair, monkeypatch):
    """An MLP whose whole output a hook writes over is skipped, with the same numbers bit for bit."""
    from mechbook.core import runs
    from mechbook.core.interventions import edit_hooks, mean_ablation

    model, ref = pair
    clean, corrupt, metric = _task(model, ref, seed=5, lengths=(8, 8, 8), shared=1)
    means = circuit_means(model, corrupt)
    ablation = edit_hooks(mean_ablation([Component("mlp", 0), Component("mlp", 1)], means))
    calls = []
    # the MLP's first weight layer runs only when the MLP is computed
    handles = [next(model.bridge.blocks[l].mlp.original_component.children()).register_forward_hook(
        lambda module, args, out, l=l: calls.append(l)) for l in range(model.n_layers)]
    try:
        runs_of = {}
        for skip in (False, True):
            on = dataclasses.replace(model, runner=runs.LocalRunner(skip_mlps=skip))
            calls.clear()
            runs_of[skip] = (run_last(on, clean, fwd_hooks=ablation)[0], sorted(calls))
        # a hook that reads the MLP's output before the ablation keeps it computed
        seen = []
        reader = [(ablation[0][0], lambda act, hook: seen.append(act.abs().sum()))]
        calls.clear()
        run_last(model, clean, fwd_hooks=reader + ablation)
        read_calls = sorted(calls)
        # so does any hook inside the MLP (names.inside_mlp): the skip never hides an activation someone reads
        calls.clear()
        inside = [(name, lambda act, hook: None) for name in model.bridge.hook_dict if inside_mlp(name) == 1][:1]
        run_last(model, clean, fwd_hooks=ablation + inside)
        inside_calls = sorted(calls)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(runs_of[True][0], runs_of[False][0])
    assert runs_of[False][1] == list(range(model.n_layers))
    skipped = [] if model.hf_model.config.model_type == "bloom" else [0, 1]
    assert runs_of[True][1] == [l for l in range(model.n_layers) if l not in skipped]
    assert seen and float(seen[0]) > 0 and 0 in read_calls
    assert inside and 1 in inside_calls and (0 not in inside_calls) == (0 in skipped)
    # the stand-in is gone after the run: the model computes every MLP again
    assert all("forward" not in model.bridge.blocks[l].mlp.original_component.__dict__ for l in range(model.n_layers))


def test_overwritten_heads_are_not_queried(pair, monkeypatch):
    """A head whose whole output a hook writes over gets no query (nor key and value, if its group is all gone):
    the same numbers bit for bit."""
    from mechbook.core import runs
    from mechbook.core.architectures import head_projections
    from mechbook.core.interventions import edit_hooks, mean_ablation

    model, ref = pair
    clean, corrupt, metric = _task(model, ref, seed=6, lengths=(8, 8, 8), shared=1)
    means = circuit_means(model, corrupt)
    # layer 0: every head but one; layer 1: every head (so its key/value heads go too)
    gone = [Component("head", 0, h) for h in range(1, model.n_heads)]
    gone += [Component("head", 1, h) for h in range(model.n_heads)]
    ablation = edit_hooks(mean_ablation(gone, means))
    q_of = {l: head_projections(model, l) for l in (0, 1)}
    fused = model.hf_model.config.model_type in ("gpt2", "gpt_neox", "bloom")
    assert (q_of[0] is None) == fused
    outputs = {}
    handles = [] if fused else [q_of[l][kind].register_forward_hook(
        lambda module, args, out, key=(l, kind): outputs.__setitem__(key, out.detach().clone()))
        for l in (0, 1) for kind in ("q", "k")]
    try:
        runs_of = {}
        for skip in (False, True):
            on = dataclasses.replace(model, runner=runs.LocalRunner(skip_heads=skip))
            outputs.clear()
            runs_of[skip] = (run_last(on, clean, fwd_hooks=ablation)[0], dict(outputs))
        # a hook inside layer 0's attention (its queries) keeps that layer's projections whole
        outputs.clear()
        run_last(model, clean, fwd_hooks=ablation + [(act_name("q", 0), lambda act, hook: None)])
        read = dict(outputs)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(runs_of[True][0], runs_of[False][0])
    if fused:
        return
    d = model.d_head
    skipped, whole = runs_of[True][1], runs_of[False][1]
    # head 0 of layer 0 is still queried, exactly as before; the others' query rows are not computed
    assert torch.equal(skipped[(0, "q")][..., :d], whole[(0, "q")][..., :d])
    assert not skipped[(0, "q")][..., d:].any() and whole[(0, "q")][..., d:].abs().sum() > 0
    assert not skipped[(1, "q")].any() and not skipped[(1, "k")].any() and whole[(1, "k")].abs().sum() > 0
    assert torch.equal(skipped[(0, "k")][..., :d], whole[(0, "k")][..., :d])  # head 0's key/value head stays
    assert torch.equal(read[(0, "q")], whole[(0, "q")]) and not read[(1, "q")].any()
    # the stand-ins are gone after the run
    assert all("forward" not in q_of[l][k].__dict__ for l in (0, 1) for k in ("q", "k", "v"))


def test_path_patching_into_q_k_v(pair):
    """Each edge: the receiver's q/k/v input reads resid + (the sender's change), nothing else moves."""
    model, ref = pair
    clean, corrupt, metric = _task(model, ref, seed=5, lengths=(8, 8, 8), shared=1)
    means = circuit_means(model, corrupt)
    ref_means = means_over(ref, corrupt.input_ids, corrupt.lengths)
    circuit = Circuit([(0, 1), (0, 3), (1, 0), (1, 2), (2, 1), (2, 3)], [0, 1, 2])
    gone_h, gone_m = complement(ref, circuit.heads, circuit.mlps)
    context = ablation_makers(ref, ref_means, gone_h, gone_m)
    base = ref.cache(clean.input_ids, context)
    edges = [Edge(Component("head", 0, 1), Component("head", 2, 1), x) for x in "qkv"]
    edges += [Edge(Component("mlp", 0), Component("head", 1, 2), "k"), Edge(Component("head", 1, 0), Component("head", 2, 3), "v")]
    got = patch_paths(model, clean, edges, metric, means=means, ablate=circuit.complement(model))
    group = ref.n_heads // ref.n_kv
    for e, values in zip(edges, got):
        s, r = e.sender, e.receiver
        # 1. the receiver layer's input with only the sender changed: freeze every other head and MLP
        freeze = []
        for l in range(s.layer, r.layer):
            def fz(z, l=l):
                new = base[("z", l)].clone()
                if l == s.layer and s.kind == "head":
                    new[:, :, s.head] = ref_means[("z", l)][: z.shape[1], s.head]
                return new
            freeze.append(ref.edit_z(l, fz))
            if l == s.layer and s.kind == "mlp":
                freeze.append(ref.edit_mlp(l, lambda x, l=l: ref_means[("mlp", l)][: x.shape[1]].expand_as(x).clone()))
            else:
                freeze.append(ref.edit_mlp(l, lambda x, l=l: base[("mlp", l)].clone()))
        changed = ref.qkv_inputs(clean.input_ids, r.layer, e.input, [*context, *freeze])
        # 2. the circuit run with that input for the receiver only (its kv head's other query heads keep their z)
        slot = r.head if e.input == "q" else r.head // group

        def put(x, slot=slot):
            x[:, :, slot] = changed[:, :, slot]
            return x
        hooks = [*context, ref.edit_qkv(r.layer, e.input, put)]
        if e.input != "q" and group > 1:
            others = [h for h in range(slot * group, (slot + 1) * group) if h != r.head]

            def keep(z, others=others, l=r.layer):
                z[:, :, others] = base[("z", l)][:, :, others]
                return z
            hooks.append(ref.edit_z(r.layer, keep))
        want = metric(ref.logits(clean.input_ids, clean.lengths, hooks))
        assert (values - want).abs().max() < TOL, e.label


def test_transplant_and_ffn_removal(pair):
    """Paper A's edits: o added after a layer / written over every later MLP output; the top MLPs removed."""
    model, ref = pair
    batch = tokenize(model, _prompts(6, (7, 9, 5)))
    g = torch.Generator().manual_seed(6)
    o = torch.randn(model.d_model, generator=g)
    layer = 1
    add, replace = Transplant("add", o, layer, "add", scale=2.0), Transplant("replace", o, layer, "replace")
    _, (got_add, got_replace) = transplant_logits(model, batch, [add, replace])
    last = batch.last_pos

    def add_last(x):
        x[torch.arange(len(x)), last] += 2.0 * o
        return x
    want_add = ref.logits(batch.input_ids, batch.lengths, [ref.edit_resid_post(layer, add_last)])
    assert (got_add - want_add).abs().max() < TOL
    first = 1 if model.prepend_bos else 0  # BOS keeps its MLP outputs (its activations are an attention sink)

    def write(x):
        x[:, first:] = o
        return x
    want_replace = ref.logits(batch.input_ids, batch.lengths,
                              [ref.edit_mlp(l, write) for l in range(layer, model.n_layers)])
    assert (got_replace - want_replace).abs().max() < TOL

    ks = [0, 1, model.n_layers]
    got = logits_without_top_mlps(model, batch, ks)
    for i, k in enumerate(ks):
        zero = [ref.edit_mlp(l, torch.zeros_like) for l in range(model.n_layers - k, model.n_layers)]
        assert (got[:, i] - ref.logits(batch.input_ids, batch.lengths, zero)).abs().max() < TOL, k


@pytest.mark.slow
def test_real_weights_in_another_class_give_the_same_numbers(tmp_path):
    """SmolLM2-135M's weights re-saved as a Qwen2 model (no hand-written loop: the generic run from a layer)
    give chapter a4's function layer, MLP effects and o, and chapter a5's transplant ranks, within 1e-4."""
    from conftest import resave_as_qwen2
    from mechbook.core.architectures import has_fast_loop
    from mechbook.papers.vector_arithmetic import ffn_update, transplant
    from mechbook.papers.vector_arithmetic.prompts import build_prompts
    from mechbook.store.cache import cached_model_dir

    smol = mechbook.load_model("smollm2-135m")
    qwen = mechbook.load_model(str(resave_as_qwen2(cached_model_dir("smollm2-135m"), tmp_path / "qwen2")))
    assert qwen.hf_model.config.model_type == "qwen2" and has_fast_loop(smol) and not has_fast_loop(qwen)
    found = []
    for model in (smol, qwen):
        task = ffn_update.find_function_layer(model, build_prompts("capitals", model, n=12, seed=0, n_shots=2))
        targets = transplant.no_context_targets(model, "capitals", n=10, seed=0)
        edits = [transplant.Transplant(m, task.mean_o(), task.layer, m) for m in ("add", "replace")]
        found.append((task, transplant.run_transplants(model, targets, edits)))
    (a, ranks_a), (b, ranks_b) = found
    assert a.layer == b.layer
    assert (a.effects.rr_jump - b.effects.rr_jump).abs().max() < TOL
    assert (a.mean_o() - b.mean_o()).abs().max() < TOL
    assert (ranks_a.rank_after.to_numpy() == ranks_b.rank_after.to_numpy()).all()
