"""Shared fixtures: tiny models built from configs (fast) and the packaged models (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _results_root_from_the_test(monkeypatch):
    """Unit tests choose their results folder themselves: scripts/test.sh sets $MECHBOOK_RESULTS for the
    chapters nbval re-executes (a temporary copy of results/), which the tests must not inherit."""
    monkeypatch.delenv("MECHBOOK_RESULTS", raising=False)


CORPUS = [
    "The capital of France is Paris. The capital of Poland is Warsaw.",
    "Q: What is the capital of Spain?\nA: Madrid",
    "Today I walk. Yesterday I walked. Today I jump. Yesterday I jumped.",
    "one two three four five six seven eight nine ten",
    "January February March April May June July August",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]


@pytest.fixture
def restore_environ():
    """Undo what a test (or the CLI it calls) sets in os.environ: TQDM_DISABLE, JUPYTER_PATH, MECHBOOK_RESULTS..."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _tokenizer(bos: bool):
    """A small byte-level BPE tokenizer trained in memory, GPT-2 style."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


ARCHITECTURES = ("gpt2", "gptj", "bloom", "gpt_neox", "llama", "qwen2", "mistral", "gemma2", "gemma3")
_NO_BOS = ("gpt2", "gptj", "bloom", "gpt_neox")  # their tokenizers put no BOS in front, as the real ones


def tiny_config(kind: str, vocab: int):
    """A tiny config of a real architecture: 3 layers, width 64, 4 heads (2 key/value heads where the family
    uses grouped-query attention), sliding windows shorter than the test prompts where the family has them."""
    import transformers as T

    common = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    gqa = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               max_position_embeddings=128)
    configs = {
        "gpt2": lambda: T.GPT2Config(n_positions=128, n_embd=64, n_layer=3, n_head=4, **common),
        "gptj": lambda: T.GPTJConfig(n_positions=128, n_embd=64, n_layer=3, n_head=4, rotary_dim=8, **common),
        "bloom": lambda: T.BloomConfig(hidden_size=64, n_layer=3, n_head=4, **common),
        "gpt_neox": lambda: T.GPTNeoXConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=128, rotary_pct=0.25, max_position_embeddings=128,
                                            use_parallel_residual=True, **common),
        "llama": lambda: T.LlamaConfig(num_key_value_heads=2, **gqa, **common),
        "qwen2": lambda: T.Qwen2Config(num_key_value_heads=2, **gqa, **common),
        "mistral": lambda: T.MistralConfig(num_key_value_heads=2, sliding_window=6, **gqa, **common),
        "gemma2": lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=16, sliding_window=6,
                                         final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                                         query_pre_attn_scalar=16, **gqa, **common),
        "gemma3": lambda: T.Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=8,
                                             final_logit_softcapping=30.0, **gqa, **common),
    }
    if kind not in configs:
        raise ValueError(kind)
    return configs[kind]()


def build_tiny_model(kind: str, directory: Path) -> Path:
    """Save a randomly initialised, tiny model of a real architecture with its tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = _tokenizer(bos=kind not in _NO_BOS)
    # a few spare rows: some tokenizer classes add a special token of their own on loading (Qwen2: <|endoftext|>)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, len(tokenizer) + 8))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def sharpen(directory: Path, factor: float = 8.0) -> Path:
    """Scale a tiny model's query and key maps so that its attention is far from uniform.

    Randomly initialised tiny models attend almost uniformly, so q and k paths barely
    matter; sharper attention gives every edge a measurable effect. Fused q/k/v maps
    (BLOOM, GPT-NeoX) are scaled whole, values included.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    d = model.config.hidden_size
    params = dict(model.named_parameters())
    qk_norm = any(name.endswith("q_norm.weight") for name in params)  # Gemma 3 normalises q and k per head
    with torch.no_grad():
        for name, p in params.items():
            if name.endswith("c_attn.weight"):  # GPT-2 Conv1D [d_model, 3 d_model]: q | k | v
                p[:, : 2 * d] *= factor
            elif name.endswith("query_key_value.weight"):
                p *= factor
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Gemma RMSNorm scales by (1 + w)
                p.fill_(factor - 1.0)
            elif name.endswith(("q_proj.weight", "k_proj.weight")) and not qk_norm:
                p *= factor
    model.save_pretrained(directory)
    return directory


def random_circuit_task(model, n_prompts: int = 6, length: int = 9, seed: int = 0):
    """Random clean prompts, their shuffles as the corrupted set, the corrupted means and a logit-difference metric.

    The metric compares the tokens whose logits the circuit moves most: the largest and
    smallest entries of (full model - everything mean-ablated), so that a random tiny
    model has a real circuit to find (its direct embedding path alone scores far below 100).
    ``metric.answer_ids`` holds the only vocabulary ids it reads.
    """
    from mechbook.core.circuits import Circuit, circuit_means, run_circuit
    from mechbook.core.runs import run_last, tokenize
    from mechbook.core.patching import logit_diff

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (n_prompts, length), generator=g)
    shuffled = torch.stack([row[torch.randperm(length, generator=g)] for row in ids])
    clean, corrupted = tokenize(model, ids.tolist()), tokenize(model, shuffled.tolist())
    means = circuit_means(model, corrupted)
    moved = run_last(model, clean)[0] - run_circuit(model, clean, Circuit([], []), means)
    metric = logit_diff(moved.argmax(-1), moved.argmin(-1))
    metric.answer_ids = torch.cat([moved.argmax(-1), moved.argmin(-1)]).unique()
    return clean, corrupted, means, metric


def random_batch(model, seed: int = 0, lengths=(9, 6, 8)):
    """Prompts of random token ids (3 to 299) of the given lengths, tokenized for ``model``."""
    from mechbook.core.runs import tokenize

    g = torch.Generator().manual_seed(seed)
    return tokenize(model, [torch.randint(3, 300, (n,), generator=g).tolist() for n in lengths])


def head_patching_case(local, other):
    """Heads 0.1 and 2.3 patched from random corrupted prompts into clean ones, on ``local`` and on ``other``.

    The metric is the logit difference of the clean prompts' first and fourth most
    likely tokens. Returns a namespace: clean, corrupt, heads, metric, ``want`` (on
    ``local``), ``got`` (on ``other``) and ``unpatched`` (the clean prompts' mean metric).
    """
    from types import SimpleNamespace

    from mechbook.core.names import Component
    from mechbook.core.patching import logit_diff, patch_head_outputs
    from mechbook.core.runs import run_last

    clean, corrupt = random_batch(local, seed=4, lengths=(7, 7)), random_batch(local, seed=5, lengths=(7, 7))
    ranked = run_last(local, clean)[0].argsort(-1, descending=True)
    metric = logit_diff(ranked[:, 0], ranked[:, 3])
    heads = [Component("head", 0, 1), Component("head", 2, 3)]
    return SimpleNamespace(clean=clean, corrupt=corrupt, heads=heads, metric=metric,
                           want=patch_head_outputs(local, corrupt, clean, metric, heads=heads),
                           got=patch_head_outputs(other, corrupt, clean, metric, heads=heads),
                           unpatched=float(metric(run_last(local, clean)[0]).mean()))


@pytest.fixture(scope="session", params=["gpt2", "llama", "gemma3"])
def tiny_dir(request, tmp_path_factory) -> Path:
    return build_tiny_model(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    import mechbook

    return mechbook.load_model(str(tiny_dir))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    import mechbook

    return mechbook.load_model(str(build_tiny_model("gpt2", tmp_path_factory.mktemp("tiny-gpt2-only"))))


@pytest.fixture(scope="session")
def gemma():
    """The default packaged model (dequantized once, then read from the cache)."""
    import mechbook

    return mechbook.load_model("gemma3-270m")


# Every other test, and nbval's re-execution of the chapters, means something only on the locked versions
# (requirements.lock); a venv that differs would spend the whole run testing another environment. So the lock
# check runs first (ordered last among the collection hooks, so that it also goes ahead of the chapter
# mechbook.book.nbval_tolerance puts first) and stops the session if it fails.
LOCK_TEST = "tests/book/test_environment.py::test_the_venv_is_the_lock"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    if os.environ.get("MECHBOOK_SKIP_SLOW"):
        skip = pytest.mark.skip(reason="MECHBOOK_SKIP_SLOW is set")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
    first = [item for item in items if item.nodeid.endswith(LOCK_TEST)]
    if first:
        items[:] = first + [item for item in items if item not in first]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and item.nodeid.endswith(LOCK_TEST):
        item.session.shouldstop = f"{report.longreprtext.strip().splitlines()[-1]}"
    return report


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' matmuls on a shared, loaded CPU run far faster on one thread than on two spinning ones.

    Use it per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def resave_as_qwen2(source: Path, directory: Path) -> Path:
    """A Llama-architecture model folder (SmolLM2's weights) re-saved as the same function in Qwen2's class.

    Qwen2 has the Llama decoder with biases on q, k and v: they are set to zero. The
    tokenizer files are copied as they are.
    """
    import shutil

    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    llama = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    c = llama.config
    config = Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
        rms_norm_eps=c.rms_norm_eps, rope_parameters=dict(c.rope_parameters), hidden_act=c.hidden_act,
        tie_word_embeddings=c.tie_word_embeddings, use_sliding_window=False,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
    )
    qwen = Qwen2ForCausalLM(config)
    state = llama.state_dict()
    for name, tensor in qwen.state_dict().items():
        if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            state[name] = torch.zeros_like(tensor)
    missing, unexpected = qwen.load_state_dict(state, strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing), (missing, unexpected)
    qwen.tie_weights()
    qwen.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(source) / name).is_file():
            shutil.copy(Path(source) / name, Path(directory) / name)
    return Path(directory)


@pytest.fixture
def edge_table():
    """A small table of edge pruning's shape (two tasks, senders, receivers, inputs, scores, kept), built by hand."""
    import pandas as pd

    from mechbook.core.circuits import RESID

    rows = [("numerals", "0.1", "2.0", "q", 70.0), ("numerals", "0.1", "2.0", "k", 90.0),
            ("numerals", "1.2", "2.0", "v", 50.0), ("numerals", "2.0", RESID, "resid", 40.0),
            ("months", "0.1", "1.2", "k", 95.0), ("months", "1.2", RESID, "resid", 60.0)]
    df = pd.DataFrame(rows, columns=["task", "sender", "receiver", "input", "score"])
    df["kept"] = df["score"] < 80
    df["sender_kind"] = "head"
    df["sender_layer"] = df["sender"].str.split(".").str[0].astype(int)
    df["sender_head"] = df["sender"].str.split(".").str[1].astype(int)
    return df
