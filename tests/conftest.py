"""Shared fixtures: tiny models built from configs (fast) and the packaged models (slow)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CORPUS = [
    "The capital of France is Paris. The capital of Poland is Warsaw.",
    "Q: What is the capital of Spain?\nA: Madrid",
    "Today I walk. Yesterday I walked. Today I jump. Yesterday I jumped.",
    "one two three four five six seven eight nine ten",
    "January February March April May June July August",
    "1 2 3 4 5 6 7 8 9 10 11 12",
]


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


def build_tiny_model(kind: str, directory: Path) -> Path:
    """Save a randomly initialised, tiny model of a real architecture with its tokenizer."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, LlamaConfig

    torch.manual_seed(0)
    tokenizer = _tokenizer(bos=kind != "gpt2")
    vocab = len(tokenizer)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=3, n_head=4,
                            bos_token_id=1, eos_token_id=2)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
    elif kind == "gemma3":
        config = Gemma3TextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                  max_position_embeddings=128, sliding_window=8, final_logit_softcapping=30.0,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
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


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MECHBOOK_SKIP_SLOW"):
        skip = pytest.mark.skip(reason="MECHBOOK_SKIP_SLOW is set")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models' matmuls on a shared, loaded CPU run far faster on one thread than on two spinning ones.

    Use it per module: ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
