"""Path patching: sender -> receiver q/k/v paths, and sender -> logits paths."""

from __future__ import annotations

import shutil

import pytest
import torch

import mechbook
from conftest import build_tiny_model, random_circuit_task, sharpen
from mechbook import MechbookError
from mechbook.core.circuits import Circuit
from mechbook.core.names import Component, act_name
from mechbook.core.path_patching import Edge, patch_paths, patch_paths_to_logits
from mechbook.core.runs import run_last, temporary_hooks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sharp_gpt2(tmp_path_factory):
    return mechbook.load_model(str(sharpen(build_tiny_model("gpt2", tmp_path_factory.mktemp("sharp-gpt2-only")))))


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma3"])
def sharp(request, tmp_path_factory):
    return mechbook.load_model(str(sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"sharp-{request.param}")))))


def _mha_twin(directory, out):
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


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def gqa_pair(request, tmp_path_factory):
    """A sharpened grouped-query tiny model and its multi-head twin (same function)."""
    gqa = sharpen(build_tiny_model(request.param, tmp_path_factory.mktemp(f"gqa-{request.param}")))
    twin = _mha_twin(gqa, tmp_path_factory.mktemp(f"twin-{request.param}"))
    return mechbook.load_model(str(gqa)), mechbook.load_model(str(twin))


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



# --- paths to the logits ---------------------------------------------------------------------------


def _reference(model, target, source, metric, sender):
    """By hand: the residual change from swapping the sender's output (read off the residual stream around it)
    added to the final residual stream at every position, in an otherwise unchanged run."""
    if sender.kind == "head":
        before, after = f"blocks.{sender.layer}.hook_resid_pre", f"blocks.{sender.layer}.hook_resid_mid"
    else:
        before, after = f"blocks.{sender.layer}.hook_resid_mid", f"blocks.{sender.layer}.hook_resid_post"
    _, src = run_last(model, source, names=[sender.hook_name])

    def swap(act, hook):
        act = act.clone()
        if sender.kind == "head":
            act[:, :, sender.head] = src[sender.hook_name][:, :, sender.head]
        else:
            act[:] = src[sender.hook_name]
        return act

    _, base = run_last(model, target, names=[before, after])
    _, swapped = run_last(model, target, names=[before, after], fwd_hooks=[(sender.hook_name, swap)])
    assert torch.allclose(swapped[before], base[before])  # the swap starts at the sender
    delta = swapped[after] - base[after]

    def add(act, hook):
        return act + delta

    logits, _ = run_last(model, target, fwd_hooks=[(act_name("final"), add)])
    return metric(logits)


def test_patch_paths_to_logits_equals_adding_the_residual_change(tiny_model):
    clean, corrupted, means, metric = random_circuit_task(tiny_model)
    senders = [Component("head", 0, 1), Component("head", 2, 3), Component("mlp", 1), Component("mlp", 2)]
    got = patch_paths_to_logits(tiny_model, corrupted, senders, metric, source=clean)
    unpatched = metric(run_last(tiny_model, corrupted)[0])
    for s, row in zip(senders, got):
        expected = _reference(tiny_model, corrupted, clean, metric, s)
        assert torch.allclose(row, expected, atol=1e-4), (s, row, expected)
    assert (got - unpatched).abs().max() > 1e-3  # the paths matter: the check has teeth
    same = patch_paths_to_logits(tiny_model, clean, senders, metric, source=clean)
    assert torch.allclose(same, metric(run_last(tiny_model, clean)[0]).expand_as(same), atol=1e-5)


def test_patch_paths_to_logits_with_means_and_tokens(tiny_model):
    clean, corrupted, means, metric = random_circuit_task(tiny_model)
    senders = [Component("head", 1, 0), Component("mlp", 0)]
    ablate = Circuit([(1, 0), (2, 1)], [0, 2]).complement(tiny_model)
    full = patch_paths_to_logits(tiny_model, clean, senders, metric, means=means, ablate=ablate)
    cheap = patch_paths_to_logits(tiny_model, clean, senders, metric, means=means, ablate=ablate,
                                  tokens=metric.answer_ids)
    assert torch.allclose(cheap, full, atol=1e-4)
    assert full.shape == (2, len(clean))


def test_patch_paths_to_logits_errors(tiny_gpt2):
    clean, corrupted, means, metric = random_circuit_task(tiny_gpt2)
    head = [Component("head", 0, 0)]
    with pytest.raises(MechbookError, match="source= .* or means="):
        patch_paths_to_logits(tiny_gpt2, clean, head, metric)
    with pytest.raises(MechbookError, match="no senders"):
        patch_paths_to_logits(tiny_gpt2, clean, [], metric, means=means)
    with pytest.raises(MechbookError, match="out of range"):
        patch_paths_to_logits(tiny_gpt2, clean, [Component("head", 0, 99)], metric, means=means)
    with pytest.raises(MechbookError, match="ablate= needs means="):
        patch_paths_to_logits(tiny_gpt2, clean, head, metric, source=corrupted, ablate=[Component("mlp", 1)])
    with pytest.raises(MechbookError, match="pair up"):
        patch_paths_to_logits(tiny_gpt2, clean, head, metric, source=corrupted.select(slice(0, 2)))


def test_edges_and_senders_must_be_components(tiny_gpt2):
    from mechbook.core.circuits import circuit_means
    from mechbook.core.patching import logit_diff
    from mechbook.core.path_patching import circuit_edges
    from mechbook.core.runs import tokenize

    batch = tokenize(tiny_gpt2, [[5, 6, 7, 8], [9, 10, 11, 12]])
    means = circuit_means(tiny_gpt2, tokenize(tiny_gpt2, [[6, 5, 8, 7], [10, 9, 12, 11]]))
    metric = logit_diff(torch.tensor([3, 4]), torch.tensor([20, 21]))
    q = Edge(Component("head", 0, 1), Component("head", 1, 1), "q")
    with pytest.raises(MechbookError, match="two Components"):
        Edge((0, 1), Component("head", 1, 1), "q")
    with pytest.raises(MechbookError, match="list of Edge"):
        patch_paths(tiny_gpt2, batch, [(q.sender, q.receiver, "q")], metric, means=means)
    with pytest.raises(MechbookError, match="ablate= takes components"):
        patch_paths(tiny_gpt2, batch, [q], metric, means=means, ablate=[(0, 1)])
    with pytest.raises(MechbookError, match="senders"):
        patch_paths_to_logits(tiny_gpt2, batch, [(0, 1)], metric, means=means)
    with pytest.raises(MechbookError, match="as \\(layer, head\\) pairs"):
        circuit_edges([1, 2])
    # a negative receiver layer counts from the end, as everywhere else
    last = Edge(Component("head", 0, 1), Component("head", -1, 1), "q")
    resolved = Edge(Component("head", 0, 1), Component("head", tiny_gpt2.n_layers - 1, 1), "q")
    assert torch.equal(patch_paths(tiny_gpt2, batch, [last], metric, means=means),
                       patch_paths(tiny_gpt2, batch, [resolved], metric, means=means))
