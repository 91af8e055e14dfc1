"""Word lists and tokenizer-aware prompts for Paper A.

Merullo, Eickhoff & Pavlick, "Language Models Implement Simple Word2Vec-style Vector
Arithmetic" (NAACL 2024, arXiv 2305.16130). Section numbers below follow the arXiv
preprint: §2.2 tasks, §3 stages of processing (logit lens), §4.1 o-vector
interventions (transplants into no-context prompts), §5 abstractive vs extractive.

Tasks (``known_tasks()``): "capitals" and the out-of-domain "us_state_capitals";
"uppercase" (red -> RED) and "uppercase_unseen"; "capitalize" (red -> Red, the form
of the paper's colored-objects answers) and "capitalize_unseen"; "past_tense" with
groups regular / irregular. Formats are listed in data/vector_arithmetic/README.md.

Every prompt is checked against the tokenizer it will be fed to: the answer id is
exactly the token that follows the prompt, i.e. ``tokenize(prompt + " " + answer)
== tokenize(prompt) + [answer_id, ...]``, and the same holds for the argument id (the
argument as a next word, ``" Poland"``, which the logit lens tracks). Items that fail
are dropped and counted with the reason (``DROP_REASONS``), never silently.

    >>> from mechbook import hooks, load_model
    >>> from mechbook.papers.vector_arithmetic.prompts import vector_arithmetic as va
    >>> model = load_model("gemma3-270m")
    >>> prompts = va.build_prompts("capitals", model, n_shots=1)
    >>> prompts.summary()            # kept / dropped per group and reason
    >>> batch = hooks.tokenize(model, prompts.token_ids)
"""

from __future__ import annotations

import csv
import io
import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from mechbook.core.checks import check
from mechbook.core.errors import MechbookError

VARIANTS = ("abstractive", "extractive", "no_context")
MULTI_TOKEN_CHOICES = ("drop", "first")
DROP_REASONS = (
    "answer_in_argument",
    "answer_multi_token",
    "answer_merges_with_prompt",
    "argument_multi_token",
    "argument_merges_with_prompt",
    "answer_equals_argument",
)
NO_CONTEXT_FILLERS = 3  # filler words before each copy of the argument (§4.1: "three random tokens")
NO_CONTEXT_REPEATS = 2  # full "filler argument" groups before the final filler

_DATA = "data"

# Source quirks of world_capitals.csv and what we do about them (see the data README).
CAPITAL_DROPPED_COUNTRIES = {
    "Bolivia": "listed twice (Sucre, La Paz); a one-answer metric would mark one of them wrong",
}
CAPITAL_RENAMED_COUNTRIES = {
    "United Kingdom; England": "United Kingdom",
    "United Kingdom Northern Ireland": "Northern Ireland",
}


@dataclass(frozen=True)
class Pair:
    """One item of a task: the function's argument, its answer and the item's group."""

    argument: str
    answer: str
    group: str


# ---------------------------------------------------------------------------
# Word lists (§2.2 tasks; §4.1 out-of-domain sets)
# ---------------------------------------------------------------------------


def _read_csv(name: str) -> list[dict[str, str]]:
    text = resources.files("mechbook.papers.vector_arithmetic").joinpath(f"{_DATA}/{name}").read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


@lru_cache(maxsize=None)
def capital_pairs() -> tuple[Pair, ...]:
    """Country -> capital pairs of the paper's World Capitals task (§2.2), group "in-domain".

    The paper's 248 rows minus Bolivia (two capitals) with two country names
    repaired; see ``CAPITAL_DROPPED_COUNTRIES`` and ``CAPITAL_RENAMED_COUNTRIES``.
    """
    pairs = []
    for row in _read_csv("world_capitals.csv"):
        country = CAPITAL_RENAMED_COUNTRIES.get(row["country"], row["country"])
        if country not in CAPITAL_DROPPED_COUNTRIES:
            pairs.append(Pair(country, row["capital"], "in-domain"))
    return tuple(pairs)


@lru_cache(maxsize=None)
def us_state_capital_pairs() -> tuple[Pair, ...]:
    """The 50 US states and their capitals, the out-of-domain capitals set of §4.1."""
    return tuple(Pair(r["state"], r["capital"], "out-of-domain") for r in _read_csv("us_state_capitals.csv"))


@lru_cache(maxsize=None)
def uppercase_pairs(split: str = "train", style: str = "upper") -> tuple[Pair, ...]:
    """Word -> WORD pairs for the uppercasing task (§2.2).

    ``split="train"``: 100 colour and household-object words (group "in-domain");
    ``split="unseen"``: 60 other words (animals, food, nature; group "out-of-domain"),
    the analogue of the paper's "100 non-color words" for transplants (§4.1).
    ``style="upper"`` gives "RED"; ``style="capitalized"`` gives "Red", the form the
    paper's colored-objects answers take ("A: Silver") and one token far more often.
    """
    groups = {"train": "in-domain", "unseen": "out-of-domain"}
    styles = {"upper": str.upper, "capitalized": str.capitalize}
    if split not in groups:
        raise MechbookError(f"unknown uppercase split {split!r}; use one of {sorted(groups)}")
    if style not in styles:
        raise MechbookError(f"unknown uppercase style {style!r}; use one of {sorted(styles)}")
    words = [r["word"] for r in _read_csv("uppercase_words.csv") if r["split"] == split]
    return tuple(Pair(word, styles[style](word), groups[split]) for word in words)


@lru_cache(maxsize=None)
def past_tense_pairs() -> tuple[Pair, ...]:
    """Verb -> past tense pairs (§2.2), group "regular" or "irregular".

    Verbs whose past tense equals the present ("put", "cut") are left out: the
    logit lens cannot tell argument from answer there (the paper filters them too).
    """
    return tuple(Pair(r["verb"], r["past"], r["group"]) for r in _read_csv("past_tense_verbs.csv"))


@lru_cache(maxsize=None)
def filler_words() -> tuple[str, ...]:
    """Ordinary words for the no-context prompts of §4.1 ("table mug free China ...")."""
    return tuple(r["word"] for r in _read_csv("filler_words.csv"))


# ---------------------------------------------------------------------------
# Prompt templates
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    """How one task writes a solved example, the final query and a stated fact."""

    example: str  # a solved in-context example, followed directly by the next one
    query: str  # the final, unsolved query; the answer follows after a space
    fact: str  # the answer stated outright, for the extractive variant (§5)


CAPITAL_TEMPLATE = PromptTemplate(
    example="Q: What is the capital of {argument}?\nA: {answer}\n",
    query="Q: What is the capital of {argument}?\nA:",
    fact="The capital of {argument} is {answer}.",
)
UPPERCASE_TEMPLATE = PromptTemplate(
    example="Q: What is the uppercase of '{argument}'?\nA: {answer}\n",
    query="Q: What is the uppercase of '{argument}'?\nA:",
    fact="The uppercase of '{argument}' is {answer}.",
)
CAPITALIZE_TEMPLATE = PromptTemplate(
    example="Q: What is '{argument}' capitalized?\nA: {answer}\n",
    query="Q: What is '{argument}' capitalized?\nA:",
    fact="'{argument}' capitalized is {answer}.",
)
PAST_TENSE_TEMPLATE = PromptTemplate(
    example="Today I {argument}. Yesterday I {answer}. ",
    query="Today I {argument}. Yesterday I",
    fact="The past tense of {argument} is {answer}.",
)


@dataclass(frozen=True)
class _Task:
    template: PromptTemplate
    pairs: Callable[[], Sequence[Pair]]
    default_shots: int


_TASKS: dict[str, _Task] = {
    "capitals": _Task(CAPITAL_TEMPLATE, capital_pairs, 3),
    "us_state_capitals": _Task(CAPITAL_TEMPLATE, us_state_capital_pairs, 3),
    "uppercase": _Task(UPPERCASE_TEMPLATE, lambda: uppercase_pairs("train"), 1),
    "uppercase_unseen": _Task(UPPERCASE_TEMPLATE, lambda: uppercase_pairs("unseen"), 1),
    "capitalize": _Task(CAPITALIZE_TEMPLATE, lambda: uppercase_pairs("train", "capitalized"), 1),
    "capitalize_unseen": _Task(CAPITALIZE_TEMPLATE, lambda: uppercase_pairs("unseen", "capitalized"), 1),
    "past_tense": _Task(PAST_TENSE_TEMPLATE, past_tense_pairs, 1),
}


def known_tasks() -> list[str]:
    """Task names ``build_prompts`` accepts."""
    return list(_TASKS)


# ---------------------------------------------------------------------------
# The prompt set
# ---------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class PromptSet:
    """Prompts of one task for one tokenizer: parallel lists, one entry per kept item.

    ``token_ids`` are what the model sees (special tokens included, e.g. Gemma's
    <bos>); ``answer_ids``/``argument_ids`` the true next token of the answer and of
    the argument. ``dropped`` has one row per item that failed a check.
    """

    task: str
    variant: str
    tokenizer_name: str
    seed: int
    n_shots: int
    multi_token: str
    items: list[str]  # the argument word, unique within a task
    groups: list[str]
    prompts: list[str]
    token_ids: list[list[int]]
    answers: list[str]
    answer_ids: list[int]
    answer_tokens: list[str]
    answer_n_tokens: list[int]  # > 1 only with multi_token="first"
    argument_ids: list[int]
    argument_tokens: list[str]
    dropped: pd.DataFrame  # columns item, group, answer, reason
    usable_by_group: dict[str, int]  # passed every check (kept, or not drawn when n is set)

    def __len__(self) -> int:
        return len(self.prompts)

    def __repr__(self) -> str:
        return (
            f"PromptSet(task={self.task!r}, variant={self.variant!r}, tokenizer={self.tokenizer_name!r}, "
            f"kept={len(self)}, dropped={len(self.dropped)})"
        )

    def target_ids(self) -> dict[str, Int[Tensor, "batch"]]:
        """Argument and answer ids as tensors, the ``targets`` of ``decoding.logit_lens``."""
        return {
            "argument": torch.tensor(self.argument_ids, dtype=torch.long),
            "answer": torch.tensor(self.answer_ids, dtype=torch.long),
        }

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt, in batch order."""
        return pd.DataFrame(
            {
                "task": self.task,
                "variant": self.variant,
                "tokenizer": self.tokenizer_name,
                "item": self.items,
                "group": self.groups,
                "prompt": self.prompts,
                "n_tokens": [len(ids) for ids in self.token_ids],
                "answer": self.answers,
                "answer_id": self.answer_ids,
                "answer_token": self.answer_tokens,
                "answer_n_tokens": self.answer_n_tokens,
                "argument_id": self.argument_ids,
                "argument_token": self.argument_tokens,
                "token_ids": self.token_ids,
            }
        )

    def summary(self) -> pd.DataFrame:
        """Counts per group plus an "all" row: candidates, dropped (per reason), usable, kept."""
        reasons = self.dropped.groupby(["group", "reason"]).size()
        kept = Counter(self.groups)
        rows = []
        for group in sorted(set(self.usable_by_group) | set(self.dropped["group"])):
            by_reason = {f"dropped_{r}": int(reasons.get((group, r), 0)) for r in DROP_REASONS}
            usable = self.usable_by_group.get(group, 0)
            n_dropped = sum(by_reason.values())
            rows.append(
                {
                    "group": group,
                    "candidates": usable + n_dropped,
                    "dropped": n_dropped,
                    "usable": usable,
                    "kept": kept[group],
                    **by_reason,
                }
            )
        frame = pd.DataFrame(rows)
        total = {"group": "all", **frame.drop(columns="group").sum().to_dict()}
        frame = pd.concat([frame, pd.DataFrame([total])], ignore_index=True)
        return frame.assign(task=self.task, variant=self.variant, tokenizer=self.tokenizer_name)[
            ["task", "variant", "tokenizer", *frame.columns]
        ]


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def build_prompts(
    task: str,
    tokenizer: Any,
    *,
    n: int | None = None,
    seed: int = 0,
    n_shots: int | None = None,
    multi_token: str = "drop",
    variant: str = "abstractive",
    pairs: Sequence[Pair] | None = None,
) -> PromptSet:
    """Build the prompts of a Paper A task for one tokenizer (or a ``LoadedModel``).

    Variants:
      * ``"abstractive"``: the in-context task of §2.2, ``n_shots`` solved examples of
        other items then the query, e.g. "Q: What is the capital of France?\\nA:
        Paris\\nQ: What is the capital of Poland?\\nA:" -> " Warsaw".
      * ``"extractive"``: the same prompt preceded by the facts of every example and of
        the query in shuffled order ("The capital of Poland is Warsaw. The capital of
        France is Paris.\\n" + abstractive prompt), as in §5. Same seed -> same
        examples and query as the abstractive prompt, so the two pair up by ``item``.
      * ``"no_context"``: the transplant prompts of §4.1, random filler words and the
        argument, repeated: "table mug free China table mug free China table mug free".
        The model's next token is the argument; the transplant target is the answer.

    ``n``: draw this many usable prompts (seeded); None keeps all. ``n_shots``: solved
    examples per prompt (task default if None; the paper's are one-shot). Examples are
    drawn per item from the other items, seeded by ``seed`` and the item, and never
    share a first word with the query's argument or answer. ``multi_token``: "drop"
    items whose answer or argument is more than one token, or score them on their
    "first" token. ``pairs`` replaces the task's word list (the template stays).
    """
    spec = _check_task(task)
    seed = check("seed", seed)
    if variant not in VARIANTS:
        raise MechbookError(f"unknown variant {variant!r}; use one of {list(VARIANTS)}")
    if multi_token not in MULTI_TOKEN_CHOICES:
        raise MechbookError(f"multi_token must be one of {list(MULTI_TOKEN_CHOICES)}, not {multi_token!r}")
    tok, tok_name = _unwrap_tokenizer(tokenizer)
    items = tuple(spec.pairs()) if pairs is None else tuple(pairs)
    _check_pairs(items)
    shots = _check_shots(n_shots, spec, variant, len(items))

    fillers = _single_token_fillers(tok) if variant == "no_context" else ()
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, str]] = []
    for pair in items:
        rng = random.Random(f"{seed}|{task}|{pair.argument}")
        prompt = _prompt_text(spec.template, pair, items, shots, variant, rng, fillers)
        row, reason = _tokenize_item(tok, prompt, pair, multi_token)
        if reason is None:
            kept.append(row)
        else:
            dropped.append({"item": pair.argument, "group": pair.group, "answer": pair.answer, "reason": reason})

    if not kept:
        raise MechbookError(_no_prompts_message(task, tok_name, variant, multi_token, dropped))
    usable_by_group = dict(Counter(r["group"] for r in kept))
    n = check("n_prompts", n, argument="n", none=True)  # None: all
    if n is not None:
        if n > len(kept):
            raise MechbookError(
                f"asked for n={n} {variant} prompts of task {task!r} but only {len(kept)} are usable with "
                f"tokenizer {tok_name!r} ({len(dropped)} dropped); pass n<={len(kept)}, n=None, or multi_token='first'"
            )
        # A seeded key per item, so variants that keep the same items draw the same ones.
        draw_key = {r["item"]: random.Random(f"{seed}|{task}|draw|{r['item']}").random() for r in kept}
        drawn = set(sorted(draw_key, key=draw_key.get)[:n])
        kept = [r for r in kept if r["item"] in drawn]

    return PromptSet(
        task=task,
        variant=variant,
        tokenizer_name=tok_name,
        seed=seed,
        n_shots=shots,
        multi_token=multi_token,
        items=[r["item"] for r in kept],
        groups=[r["group"] for r in kept],
        prompts=[r["prompt"] for r in kept],
        token_ids=[r["token_ids"] for r in kept],
        answers=[r["answer"] for r in kept],
        answer_ids=[r["answer_id"] for r in kept],
        answer_tokens=[tok.decode([r["answer_id"]]) for r in kept],
        answer_n_tokens=[r["answer_n_tokens"] for r in kept],
        argument_ids=[r["argument_id"] for r in kept],
        argument_tokens=[tok.decode([r["argument_id"]]) for r in kept],
        dropped=pd.DataFrame(dropped, columns=["item", "group", "answer", "reason"]),
        usable_by_group=usable_by_group,
    )


def _check_task(task: str) -> _Task:
    if task not in _TASKS:
        raise MechbookError(f"unknown task {task!r}; known: {known_tasks()}")
    return _TASKS[task]


def _unwrap_tokenizer(tokenizer: Any) -> tuple[Any, str]:
    """Accept a Hugging Face tokenizer or a ``LoadedModel``; return it and a display name."""
    if hasattr(tokenizer, "bridge") and hasattr(tokenizer, "tokenizer"):
        return tokenizer.tokenizer, str(tokenizer.name)
    if isinstance(tokenizer, (str, Path)) or not callable(tokenizer) or not hasattr(tokenizer, "decode"):
        raise MechbookError(
            f"expected a tokenizer or a LoadedModel, got {type(tokenizer).__name__}; "
            "pass load_model(name) or transformers.AutoTokenizer.from_pretrained(path)"
        )
    path = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    return tokenizer, Path(path).name or path


def _check_pairs(pairs: Sequence[Pair]) -> None:
    if not pairs:
        raise MechbookError("no pairs given; pass a non-empty list of Pair(argument, answer, group)")
    seen: set[str] = set()
    for pair in pairs:
        if not isinstance(pair, Pair):
            raise MechbookError(f"pairs must be Pair(argument, answer, group) objects, got {pair!r}")
        if not all(isinstance(w, str) and w.strip() for w in (pair.argument, pair.answer)):
            raise MechbookError(f"{pair!r} needs a word as argument and as answer (non-empty str)")
        if pair.argument in seen:
            raise MechbookError(f"argument {pair.argument!r} appears twice; keep one answer per argument")
        seen.add(pair.argument)


def _check_shots(n_shots: int | None, spec: _Task, variant: str, n_items: int) -> int:
    if variant == "no_context":
        if n_shots:
            raise MechbookError("no_context prompts have no solved examples; leave n_shots unset")
        return 0
    shots = spec.default_shots if n_shots is None else check("n_shots", n_shots)
    if shots >= n_items:
        raise MechbookError(f"n_shots={shots} needs at least {shots + 1} items, the task has {n_items}; lower n_shots")
    return shots


def _first_words(pair: Pair) -> set[str]:
    return {pair.argument.split()[0].lower(), pair.answer.split()[0].lower()}


def _prompt_text(
    template: PromptTemplate,
    pair: Pair,
    pool: Sequence[Pair],
    n_shots: int,
    variant: str,
    rng: random.Random,
    fillers: Sequence[str],
) -> str:
    """The prompt string of one item; all randomness comes from ``rng`` (seeded per item)."""
    if variant == "no_context":
        words = [w for w in fillers if w.lower() not in _first_words(pair)]
        chosen = rng.sample(words, NO_CONTEXT_FILLERS)
        return " ".join([*chosen, pair.argument] * NO_CONTEXT_REPEATS + chosen)

    query_words = _first_words(pair)
    others = [p for p in pool if p is not pair and not (_first_words(p) & query_words)]
    if len(others) < n_shots:
        raise MechbookError(
            f"only {len(others)} items can serve as examples for {pair.argument!r}, n_shots={n_shots}; lower n_shots"
        )
    examples = rng.sample(others, n_shots)
    prompt = "".join(template.example.format(argument=p.argument, answer=p.answer) for p in examples)
    prompt += template.query.format(argument=pair.argument)
    # Draw the fact order whatever the variant, so abstractive and extractive share the same rng stream.
    facts = [*examples, pair]
    rng.shuffle(facts)
    if variant == "extractive":
        stated = " ".join(template.fact.format(argument=p.argument, answer=p.answer) for p in facts)
        prompt = stated + "\n" + prompt
    return prompt


def _single_token_fillers(tokenizer: Any) -> list[str]:
    """Filler words that are one token after a space, like the paper's "three random tokens"."""
    words = [w for w in filler_words() if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    if len(words) < NO_CONTEXT_FILLERS + 2:
        raise MechbookError("too few single-token filler words for this tokenizer; extend filler_words.csv")
    return words


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _next_word_ids(tokenizer: Any, prompt: str, prompt_ids: list[int], word: str) -> list[int] | None:
    """Tokens ``" " + word`` adds after the prompt, or None if it re-tokenizes the prompt."""
    full = _encode(tokenizer, f"{prompt} {word}")
    if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
        return None
    return full[len(prompt_ids) :]


def _tokenize_item(tokenizer: Any, prompt: str, pair: Pair, multi_token: str) -> tuple[dict[str, Any], str | None]:
    """Token ids of one prompt and its targets, or the reason the item is dropped."""
    if re.search(rf"(?<!\w){re.escape(pair.answer)}(?!\w)", pair.argument):
        return {}, "answer_in_argument"  # "Guinea-Bissau" -> "Bissau": the query gives the answer away
    prompt_ids = _encode(tokenizer, prompt)
    found: dict[str, list[int]] = {}
    for role, word in (("answer", pair.answer), ("argument", pair.argument)):
        ids = _next_word_ids(tokenizer, prompt, prompt_ids, word)
        if ids is None:
            return {}, f"{role}_merges_with_prompt"
        if len(ids) > 1 and multi_token == "drop":
            return {}, f"{role}_multi_token"
        found[role] = ids
    if found["answer"][0] == found["argument"][0]:
        return {}, "answer_equals_argument"
    row = {
        "item": pair.argument,
        "group": pair.group,
        "prompt": prompt,
        "token_ids": prompt_ids,
        "answer": pair.answer,
        "answer_id": found["answer"][0],
        "answer_n_tokens": len(found["answer"]),
        "argument_id": found["argument"][0],
    }
    return row, None


def _no_prompts_message(task: str, tok_name: str, variant: str, multi_token: str, dropped: list[dict[str, str]]) -> str:
    counts = dict(Counter(d["reason"] for d in dropped))
    hint = (
        "try multi_token='first' to score multi-token answers on their first token"
        if multi_token == "drop"
        else "check that the tokenizer belongs to the model and that the word list suits it (pairs=...)"
    )
    return f"task {task!r} ({variant}) yields no usable prompts for tokenizer {tok_name!r}: dropped {counts}; {hint}"

