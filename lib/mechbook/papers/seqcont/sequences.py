"""Sequence-continuation prompts (Paper B: Lan, Torr & Barez 2024, Sec. 3), built per tokenizer.

"Van done in 1. Hat done in 2. Ring done in 3. Desk done in 4. Sun done in" -> " 5":
the metric compares the next member (``corr``) with the last member shown
(``incorr``) at the final position.

Three steps, each a function:

1. :func:`load_paper_prompts` reads the paper's prompts (numerals, number words,
   months; templates "done", "names", "lost" and the corrupted set), and
   :func:`make_prompts` builds new ones of the same form (other templates, starts,
   lengths, steps, Spanish words, corrupted twins).
2. :func:`tokenize_prompts` fits them to a tokenizer. GPT-2 reads " 5" as one token;
   Gemma 3 and SmolLM2 split it into "▁" + "5", so the model's prompt has to end
   with the "▁" and the answer is "5". Rule, for prompt P and continuation C with
   leading whitespace W (C = W + C'): tokenize P + C and P + W; the model's prompt
   is their longest common prefix and the answer is the next token of P + C.
   Words that carry their own space (" five" -> "▁five") keep the prompt at P; the
   answer is always the token the model would really read next. Prompts where the
   rule cannot compare corr with incorr are dropped with a counted reason.
3. :func:`score_prompts` / :func:`filter_solved` keep the prompts the model solves,
   p(corr) > 2 x p(incorr) at the last position, as the paper does.
"""

from __future__ import annotations

import json
import string
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor
from tqdm import tqdm

from mechbook.core.checks import check, chunk_starts
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.core.runs import run_last, tokenize

PAPER_TASKS = ("numerals", "numwords", "months")
PAPER_TEMPLATES = {
    "done": "{object} done in {member}.",
    "names": "{name} born in {member}.",
    "lost": "{object} lost in {member}.",
}
PAPER_SETS = (*PAPER_TEMPLATES, "corrupted")
_PAPER_VERBS = {"done": "done", "lost": "lost", "born": "names"}

NUMBER_WORDS = (
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
)  # fmt: skip
NUMBER_WORDS_ES = (
    "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez",
    "once", "doce", "trece", "catorce", "quince", "dieciséis", "diecisiete",
    "dieciocho", "diecinueve", "veinte",
)  # fmt: skip
MONTHS_ES = (
    "enero", "febrero", "marzo", "abril", "mayo", "junio",
    "julio", "agosto", "septiembre", "octubre", "noviembre", "diciembre",
)  # fmt: skip
WORD_SEQUENCES = {"numwords": NUMBER_WORDS, "months": MONTHS, "numwords_es": NUMBER_WORDS_ES, "months_es": MONTHS_ES}
GENERATOR_TASKS = ("numerals", *WORD_SEQUENCES)
CORRUPTIONS = ("shuffle", "resample")

DROP_REASONS = {
    "prompt_differs": "the prompt tokens before corr and before incorr differ",
    "whitespace_answer": "the first answer token is only whitespace",
    "answer_inside_prompt": "the first answer token also covers the end of the prompt text",
    "same_first_token": "corr and incorr start with the same token (e.g. ' 12' vs ' 11' -> '1')",
    "not_solved": "the model does not give p(corr) > ratio x p(incorr)",
}
_DROP_COLUMNS = ["source_index", "template", "text", "corr", "incorr", "reason", "detail"]
_MEMBER = "{member}"
_FILLERS = ("name", "object")


class SeqPromptWarning(UserWarning):
    """Prompts were dropped or will be scored on their first token only."""


def _no_drops() -> pd.DataFrame:
    return pd.DataFrame(columns=_DROP_COLUMNS)


@dataclass(frozen=True, eq=False)
class SeqPromptSet:
    """Sequence-continuation prompts, one list entry per prompt; token fields once tokenized.

    ``text`` is the prompt as written (no trailing space), ``corr``/``incorr`` the
    continuations with their leading space (" 5", " 4"), ``members`` the members
    shown (parsed from ``text``). After :func:`tokenize_prompts`, ``prompt_ids`` are
    exactly the tokens the model reads and ``corr_id``/``incorr_id`` the token it
    should/should not read next. ``dropped`` lists every prompt removed on the way
    and why. ``source_index`` is the row in the source file (or generator), which
    pairs a corrupted prompt with its clean one.
    """

    task: str
    kind: str  # "clean" or "corrupted"
    text: list[str]
    members: list[tuple[str, ...]]
    corr: list[str]
    incorr: list[str]
    template: list[str]
    source_index: list[int]
    prompt_ids: list[list[int]] | None = None
    prompt_text: list[str] | None = None
    corr_id: list[int] | None = None
    incorr_id: list[int] | None = None
    corr_n_tokens: list[int] | None = None
    incorr_n_tokens: list[int] | None = None
    tokenizer_key: tuple | None = field(default=None, repr=False)
    dropped: pd.DataFrame = field(default_factory=_no_drops, repr=False)

    def __post_init__(self) -> None:
        n = len(self.text)
        for name in ("members", "corr", "incorr", "template", "source_index", *_TOKEN_FIELDS):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise MechbookError(f"SeqPromptSet.{name} has {len(value)} entries for {n} prompts; build sets with "
                                    "load_paper_prompts / make_prompts, or keep every per-prompt list the same length")

    def __len__(self) -> int:
        return len(self.text)

    def __repr__(self) -> str:
        tokens = f", tokenized, lengths {_counts(self.length_counts())}" if self.is_tokenized else ""
        return f"SeqPromptSet({self.task}/{self.kind}: {len(self)} prompts, {len(self.dropped)} dropped{tokens})"

    @property
    def is_tokenized(self) -> bool:
        return self.prompt_ids is not None

    def _need_tokens(self, what: str) -> None:
        if not self.is_tokenized:
            raise MechbookError(f"{what} needs token ids; call tokenize_prompts(prompts, model.tokenizer) first")

    @property
    def n_tokens(self) -> list[int]:
        """Length of each tokenized prompt (BOS included when the tokenizer adds it)."""
        self._need_tokens("n_tokens")
        return [len(ids) for ids in self.prompt_ids]

    def to_frame(self) -> pd.DataFrame:
        """One row per prompt: text, members, answers and (once tokenized) token ids and lengths."""
        frame = pd.DataFrame({
            "task": self.task,
            "kind": self.kind,
            "template": self.template,
            "source_index": self.source_index,
            "text": self.text,
            "members": self.members,
            "corr": self.corr,
            "incorr": self.incorr,
        })  # fmt: skip
        if self.is_tokenized:
            frame["prompt_text"] = self.prompt_text
            frame["n_tokens"] = self.n_tokens
            frame["corr_id"] = self.corr_id
            frame["incorr_id"] = self.incorr_id
            frame["corr_n_tokens"] = self.corr_n_tokens
            frame["incorr_n_tokens"] = self.incorr_n_tokens
        return frame

    def select(self, positions: Sequence[int]) -> SeqPromptSet:
        """The prompts at these positions (0..len-1), in this order; ``dropped`` is kept."""
        positions = [int(p) for p in positions]
        if any(not 0 <= p < len(self) for p in positions):
            raise MechbookError(f"positions must lie in 0..{len(self) - 1}; got {positions[:5]}...")
        picked = {
            name: [getattr(self, name)[p] for p in positions]
            for name in ("text", "members", "corr", "incorr", "template", "source_index", *_TOKEN_FIELDS)
            if getattr(self, name) is not None
        }
        return replace(self, **picked)

    def drop_counts(self) -> pd.Series:
        """How many prompts were dropped, per reason (see ``DROP_REASONS``)."""
        return self.dropped["reason"].value_counts().rename("n_prompts")

    def length_counts(self) -> pd.Series:
        """How many prompts have each token length; the paper's batching assumes one length."""
        self._need_tokens("length_counts")
        return pd.Series(self.n_tokens, dtype=int).value_counts().sort_index().rename("n_prompts")

    def by_length(self) -> dict[int, SeqPromptSet]:
        """The set split into equal-length groups, for code that needs aligned positions."""
        self._need_tokens("by_length")
        groups: dict[int, list[int]] = {}
        for position, n in enumerate(self.n_tokens):
            groups.setdefault(n, []).append(position)
        return {n: self.select(groups[n]) for n in sorted(groups)}

    def token_tensors(self, pad_token_id: int = 0) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch"]]:
        """Right-padded prompt token ids and each prompt's length (read answers at length - 1)."""
        self._need_tokens("token_tensors")
        return _right_pad(self.prompt_ids, pad_token_id)

    def answer_tensors(self) -> tuple[Int[Tensor, "batch"], Int[Tensor, "batch"]]:
        """corr and incorr token ids, for a logit-difference metric."""
        self._need_tokens("answer_tensors")
        return torch.tensor(self.corr_id), torch.tensor(self.incorr_id)


_TOKEN_FIELDS = ("prompt_ids", "prompt_text", "corr_id", "incorr_id", "corr_n_tokens", "incorr_n_tokens")


# ---------------------------------------------------------------------------------------------
# The paper's prompts


def _data_file(name: str):
    return resources.files("mechbook.papers.seqcont").joinpath("data", name)


@lru_cache(maxsize=None)
def _read_json(name: str) -> Any:
    path = _data_file(name)
    if not path.is_file():
        raise MechbookError(f"packaged data file data/seqcont/{name} is missing; reinstall mechbook (pip install -e .)")
    return json.loads(path.read_text(encoding="utf-8"))


def _parse_paper_text(text: str) -> tuple[str, tuple[str, ...]] | None:
    """Template key and members shown in a paper prompt ("Van done in 1. ... Sun done in")."""
    clauses = text.split(". ")
    parsed = []
    for clause in clauses:
        words = clause.split(" ")
        if len(words) < 3 or words[2] != "in" or words[1] not in _PAPER_VERBS:
            return None
        parsed.append((_PAPER_VERBS[words[1]], " ".join(words[3:])))
    templates = {t for t, _ in parsed}
    *shown, (_, last) = parsed
    if len(templates) != 1 or last != "" or any(m == "" for _, m in shown) or not text.endswith(" in"):
        return None
    return templates.pop(), tuple(m.removesuffix(".") for _, m in shown)


def load_paper_prompts(task: str = "numerals", template: str = "done") -> SeqPromptSet:
    """The paper's 1024 clean prompts of one task and template, or its 1536 corrupted prompts.

    Members are parsed from ``text``: in the corrupted set the S1..S4 fields of the
    release often disagree with the text (see data/seqcont/README.md).
    """
    if task not in PAPER_TASKS:
        raise MechbookError(f"unknown Paper B task {task!r}; known: {', '.join(PAPER_TASKS)} "
                            "(make_prompts builds others: " + ", ".join(GENERATOR_TASKS) + ")")
    if template not in PAPER_SETS:
        raise MechbookError(f"unknown Paper B prompt set {template!r}; known: {', '.join(PAPER_SETS)}")
    rows = _read_json(f"{task}_{template}.json")
    texts, members, templates = [], [], []
    for k, row in enumerate(rows):
        parsed = _parse_paper_text(row["text"])
        if parsed is None:
            raise MechbookError(f"row {k} of data/seqcont/{task}_{template}.json does not read as a paper prompt "
                                f"({row['text']!r}); re-copy the file from /work/shared/data/seqcont")
        texts.append(row["text"])
        templates.append(parsed[0])
        members.append(parsed[1])
    return SeqPromptSet(
        task=task,
        kind="corrupted" if template == "corrupted" else "clean",
        text=texts,
        members=members,
        corr=[row["corr"] for row in rows],
        incorr=[row["incorr"] for row in rows],
        template=templates,
        source_index=list(range(len(rows))),
    )


def paper_gpt2small_circuit(task: str = "numerals") -> dict[str, list]:
    """The node circuit the paper found in GPT-2 small (Sec. 4): heads as (layer, head), MLP layers."""
    if task not in PAPER_TASKS:
        raise MechbookError(f"unknown Paper B task {task!r}; known: {', '.join(PAPER_TASKS)}")
    raw = _read_json(f"{task}_gpt2small_circuit.json")
    return {"heads": [tuple(h) for h in raw["heads"]], "mlps": list(raw["mlps"])}


@lru_cache(maxsize=None)
def paper_object_words() -> tuple[str, ...]:
    """Capitalised object words of the "done in"/"lost in" templates (common_words.json), deduplicated."""
    words = _read_json("common_words.json")["common_words"]
    return tuple(dict.fromkeys(w for w in words if w[:1].isupper() and w.isalpha()))


@lru_cache(maxsize=None)
def paper_names() -> tuple[str, ...]:
    """The first names used by the paper's "born in" template."""
    names = (clause.split(" ")[0] for row in _read_json("numerals_names.json") for clause in row["text"].split(". "))
    return tuple(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Fitting prompts to a tokenizer


def _tokenizer_key(tokenizer: Any) -> tuple:
    """A fingerprint that tells tokenizers apart (``name_or_path`` is not reliable for cached ones)."""
    probe = tokenizer("Sun done in 12. Jamie born in May, five", add_special_tokens=True).input_ids
    return (type(tokenizer).__name__, len(tokenizer), tuple(probe))


def _encoder(tokenizer: Any):
    """Batch-encode texts as the model reads them: the tokenizer's BOS, without a closing EOS."""
    eos = tokenizer.eos_token_id
    probe = tokenizer("a", add_special_tokens=True).input_ids
    adds_eos = eos is not None and len(probe) > 1 and probe[-1] == eos

    def encode(texts: list[str]) -> list[list[int]]:
        rows = tokenizer(texts, add_special_tokens=True).input_ids
        return [row[:-1] if adds_eos else row for row in rows]

    return encode


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split_answer(full: list[int], reference: list[int]) -> tuple[list[int], int | None, int]:
    """Prompt tokens, first answer token and answer length: ``full`` = tokens of P + C,
    ``reference`` = tokens of P + its whitespace."""
    shared = _common_prefix_length(full, reference)
    if shared == len(full):
        return full, None, 0
    return full[:shared], full[shared], len(full) - shared


def _is_blank(tokenizer: Any, token_id: int | None) -> bool:
    return token_id is None or not tokenizer.decode([token_id]).strip()


def _counts(series: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in series.items()}


def _leading_whitespace(s: str) -> str:
    return s[: len(s) - len(s.lstrip())]


def _check_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer (a model's ``.tokenizer`` too), or a one-line error: a name or None is no tokenizer."""
    if isinstance(tokenizer, LoadedModel):
        return tokenizer.tokenizer
    if tokenizer is None or isinstance(tokenizer, (str, bytes)) or not callable(tokenizer):
        raise MechbookError(f"expected a tokenizer, got {type(tokenizer).__name__}; pass model.tokenizer of "
                            "load_model(name)")
    return tokenizer


def _tokenize(prompts: SeqPromptSet, tokenizer: Any) -> tuple[SeqPromptSet, dict[str, int], pd.DataFrame]:
    """Tokenized set, token count of every answer string, and the prompts dropped here."""
    encode = _encoder(tokenizer)
    texts = prompts.text
    full_c = encode([t + c for t, c in zip(texts, prompts.corr)])
    full_i = encode([t + c for t, c in zip(texts, prompts.incorr)])
    ref_c = encode([t + _leading_whitespace(c) for t, c in zip(texts, prompts.corr)])
    ref_i = encode([t + _leading_whitespace(c) for t, c in zip(texts, prompts.incorr)])

    kept: dict[str, list] = {name: [] for name in _TOKEN_FIELDS}
    keep_positions, drops, answer_lengths = [], [], {}
    for k, text in enumerate(texts):
        prompt_c, answer_c, n_c = _split_answer(full_c[k], ref_c[k])
        prompt_i, answer_i, n_i = _split_answer(full_i[k], ref_i[k])
        answer_lengths[prompts.corr[k].strip()] = n_c
        answer_lengths[prompts.incorr[k].strip()] = n_i
        shown = tokenizer.decode(prompt_c, skip_special_tokens=True)
        if prompt_c != prompt_i:
            reason, detail = "prompt_differs", f"{len(prompt_c)} vs {len(prompt_i)} prompt tokens"
        elif _is_blank(tokenizer, answer_c) or _is_blank(tokenizer, answer_i):
            reason, detail = "whitespace_answer", f"answer ids {answer_c} / {answer_i}"
        elif len(shown) < len(text):
            reason, detail = "answer_inside_prompt", f"prompt tokens read {shown[-12:]!r}"
        elif answer_c == answer_i:
            reason, detail = "same_first_token", f"both start with {tokenizer.decode([answer_c])!r}"
        else:
            keep_positions.append(k)
            for name, value in zip(_TOKEN_FIELDS, (prompt_c, shown, answer_c, answer_i, n_c, n_i)):
                kept[name].append(value)
            continue
        drops.append({
            "source_index": prompts.source_index[k], "template": prompts.template[k], "text": text,
            "corr": prompts.corr[k], "incorr": prompts.incorr[k], "reason": reason, "detail": detail,
        })  # fmt: skip
    dropped = pd.DataFrame(drops, columns=_DROP_COLUMNS)
    untokenized = replace(prompts, **{name: None for name in _TOKEN_FIELDS}, tokenizer_key=None)
    subset = untokenized.select(keep_positions)
    tokenized = replace(subset, **kept, tokenizer_key=_tokenizer_key(tokenizer),
                        dropped=pd.concat([prompts.dropped, dropped], ignore_index=True) if drops else prompts.dropped)
    return tokenized, answer_lengths, dropped


def _warn_dropped(prompts: SeqPromptSet, dropped: pd.DataFrame, tokenizer: Any) -> None:
    if dropped.empty:
        return
    parts = []
    for reason, group in dropped.groupby("reason", sort=False):
        first = group.iloc[0]
        parts.append(f"{reason}: {len(group)} ({DROP_REASONS[reason]}; e.g. row {first['source_index']}, "
                     f"{first['corr']!r} vs {first['incorr']!r}, {first['detail']})")
    warnings.warn(
        f"{prompts.task}/{prompts.kind}: dropped {len(dropped)} of {len(prompts)} prompts for "
        f"{type(tokenizer).__name__} ({len(tokenizer)} tokens): " + "; ".join(parts)
        + ". They are listed in .dropped (drop_counts() counts them).",
        SeqPromptWarning,
        stacklevel=3,
    )


def tokenize_prompts(prompts: SeqPromptSet, tokenizer: Any) -> SeqPromptSet:
    """Fit prompts to a tokenizer: the model's prompt tokens and its true next token.

    For prompt P and continuation C = W + C' (W its leading whitespace) the prompt is
    the longest common prefix of tokenize(P + C) and tokenize(P + W), the answer the
    next token of tokenize(P + C); so prompt_ids + [corr_id] starts tokenize(P + corr).
    Multi-token answers are scored on their first token. A prompt is dropped (with a
    :class:`SeqPromptWarning` and a row in ``.dropped``) when corr and incorr need
    different prompt tokens or start with the same token (" 12" vs " 11").
    """
    if len(prompts) == 0:
        raise MechbookError("no prompts to tokenize; the set is empty (see its .dropped for why)")
    tokenizer = _check_tokenizer(tokenizer)
    if prompts.is_tokenized:
        if prompts.tokenizer_key == _tokenizer_key(tokenizer):
            return prompts
        raise MechbookError("these prompts are already fitted to another tokenizer (and lost its drops); "
                            "tokenize the set from load_paper_prompts / make_prompts again for this one")
    tokenized, _, dropped = _tokenize(prompts, tokenizer)
    _warn_dropped(prompts, dropped, tokenizer)
    return tokenized


# ---------------------------------------------------------------------------------------------
# New prompts of the same form


def sequence_members(task: str, start: int, count: int, step: int = 1) -> list[str]:
    """``count`` members of a task's sequence from ``start`` (1-based: numerals from the value itself)."""
    from mechbook.core.names import as_index

    start, count, step = as_index(start, "start"), as_index(count, "count"), as_index(step, "step")
    if count < 1 or step == 0:
        raise MechbookError(f"sequence_members needs count >= 1 and a non-zero step, got count={count}, step={step}; "
                            "e.g. sequence_members('months', 1, 4)")
    if task == "numerals":
        values = [start + step * k for k in range(count)]
        if min(values) < 0:
            raise MechbookError(f"numerals from {start} in steps of {step} go below 0; choose a larger start")
        return [str(v) for v in values]
    if task not in WORD_SEQUENCES:
        raise MechbookError(f"unknown sequence task {task!r}; known: {', '.join(GENERATOR_TASKS)}")
    words = WORD_SEQUENCES[task]
    index = [start - 1 + step * k for k in range(count)]
    if min(index) < 0 or max(index) >= len(words):
        raise MechbookError(f"{task} has {len(words)} members ({words[0]} .. {words[-1]}); "
                            f"{count} of them from start {start} in steps of {step} do not fit; "
                            "choose another start, fewer members or a smaller step")
    return [words[i] for i in index]


def _check_template(template: str) -> tuple[str, str]:
    """Template key (paper name or the string itself) and the template string, validated."""
    if template in PAPER_TEMPLATES:
        return template, PAPER_TEMPLATES[template]
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise MechbookError(f"template {template!r} is not a valid format string ({exc}); "
                            "write literal braces as {{ and }}") from exc
    if fields.count("member") != 1:
        raise MechbookError(
            f"template {template!r} must contain the placeholder {_MEMBER} exactly once (it has "
            f"{fields.count('member')}); e.g. '{{name}} born in {{member}}.', or use a paper template: "
            + ", ".join(PAPER_TEMPLATES)
        )
    unknown = sorted(set(fields) - {"member", *_FILLERS})
    if unknown:
        raise MechbookError(f"template {template!r} has unknown placeholders {unknown}; "
                            "allowed: {member}, {name} (a first name), {object} (an object word)")
    return template, template


def _filler_pool(given: Sequence[str] | None, default: Sequence[str], what: str, members: set[str]) -> list[str]:
    if isinstance(given, str) or (given is not None and not all(isinstance(w, str) for w in given)):
        raise MechbookError(f"{what} must be a list of words, got {given!r}; wrap a single one in a list: "
                            f"{what}=[{given!r}]" if isinstance(given, str) else f"{what} must be a list of words (str)")
    pool = list(default if given is None else given)
    # A filler that is also a sequence member ("April born in ...") would blur the task.
    pool = [w for w in pool if w.lower() not in members]
    if not pool:
        raise MechbookError(f"no usable {what}: the list is empty or holds only sequence members; pass {what}=[...]")
    return pool


def make_prompts(
    task: str = "numerals",
    *,
    template: str = "done",
    n_prompts: int = 128,
    starts: Sequence[int] | None = None,
    n_members: int = 4,
    step: int = 1,
    separator: str = " ",
    corrupted: str | None = None,
    seed: int = 0,
    objects: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    tokenizer: Any = None,
) -> SeqPromptSet:
    """New prompts of the paper's form: ``n_members`` members in a template, then the next one.

    ``task``: numerals, numwords, months, numwords_es (uno dos ...), months_es (enero
    ...); ``step`` > 1 gives interval sequences ("2 4 6 8" -> " 10"). ``template`` is
    a paper template ("done", "names", "lost") or a string with {member} and
    optionally {name} / {object}, e.g. "{name} born in {member}.". Row ``k`` starts
    at ``starts[k % len(starts)]``, as in the paper's files (default: every start in
    1..8 that fits).
    ``corrupted="shuffle"`` shows the same members in a random non-sequential order,
    ``"resample"`` draws them at random from the members the clean set uses (as the
    paper's corrupted set does); both keep the fillers, ``corr`` and ``incorr`` of
    the clean set with the same seed, so the two sets pair up row by row. With a
    ``tokenizer`` the set comes back tokenized, with a warning listing answers that
    take several tokens (scored on their first).
    """
    if task not in GENERATOR_TASKS:
        raise MechbookError(f"unknown sequence task {task!r}; known: {', '.join(GENERATOR_TASKS)}")
    n_prompts, n_members = check("n_prompts", n_prompts), check("n_members", n_members)
    seed = check("seed", seed)
    from mechbook.core.names import as_index

    step = as_index(step, "step")
    if not isinstance(separator, str):
        raise MechbookError(f"separator must be a str (e.g. ' '), got {separator!r}")
    if starts is not None:
        if isinstance(starts, (str, bytes)) or not hasattr(starts, "__iter__"):
            raise MechbookError(f"starts takes a list of start positions, e.g. starts=[1, 2], got {starts!r}")
        starts = [as_index(s, "start") for s in starts]
        if not starts:
            raise MechbookError("starts=[] gives no prompt; pass at least one start, or None for every start that fits")
    if step == 0:
        raise MechbookError("step must be non-zero (1 for consecutive members, 2 for '2 4 6', -1 to count down)")
    if corrupted not in (None, *CORRUPTIONS):
        raise MechbookError(f"corrupted must be None or one of {', '.join(CORRUPTIONS)}; got {corrupted!r}")
    if corrupted == "shuffle" and n_members < 2:
        raise MechbookError("a shuffled corruption needs n_members >= 2")
    template_key, template_text = _check_template(template)

    def fits(start: int) -> bool:
        try:
            sequence_members(task, start, n_members + 1, step)
        except MechbookError:
            return False
        return True

    if starts is None:
        starts = [s for s in range(1, 9) if fits(s)]
        if not starts:
            raise MechbookError(f"no start in 1..8 fits {n_members} members + 1 in steps of {step} for {task}; "
                                "pass starts=[...], fewer members or a smaller step")
    for s in starts:
        sequence_members(task, int(s), n_members + 1, step)  # raises with the valid range
    starts = [int(s) for s in starts]

    sequences = [sequence_members(task, starts[i % len(starts)], n_members + 1, step) for i in range(n_prompts)]
    order = WORD_SEQUENCES[task].index if task in WORD_SEQUENCES else int
    vocabulary = sorted({m for seq in sequences for m in seq}, key=order)
    all_members = {m.lower() for m in WORD_SEQUENCES.get(task, vocabulary)}
    fill_rng = np.random.default_rng([seed, 0])
    corrupt_rng = np.random.default_rng([seed, 1])
    pools = {
        "name": _filler_pool(names, paper_names(), "names", all_members),
        "object": _filler_pool(objects, paper_object_words(), "objects", all_members),
    }
    used = [f for f in _FILLERS if "{" + f + "}" in template_text]
    sentinel = "\x00"

    texts, shown_members, corr, incorr = [], [], [], []
    for seq in sequences:
        clean, nxt = seq[:-1], seq[-1]
        fillers = {
            f: fill_rng.choice(pools[f], size=n_members + 1, replace=len(pools[f]) < n_members + 1).tolist()
            for f in used
        }
        shown = list(clean)
        if corrupted == "shuffle":
            while shown == clean:
                shown = [clean[i] for i in corrupt_rng.permutation(n_members)]
        elif corrupted == "resample":
            shown = [vocabulary[i] for i in corrupt_rng.integers(len(vocabulary), size=n_members)]
        clauses = [template_text.format(member=m, **{f: fillers[f][k] for f in used}) for k, m in enumerate(shown)]
        last = template_text.format(member=sentinel, **{f: fillers[f][-1] for f in used}).split(sentinel)[0]
        head = separator.join(clauses) + separator + last
        text = head.rstrip()
        space = head[len(text):]
        texts.append(text)
        shown_members.append(tuple(shown))
        corr.append(space + nxt)
        incorr.append(space + clean[-1])

    prompts = SeqPromptSet(
        task=task if step == 1 else f"{task}_step{step}",
        kind="clean" if corrupted is None else "corrupted",
        text=texts,
        members=shown_members,
        corr=corr,
        incorr=incorr,
        template=[template_key] * n_prompts,
        source_index=list(range(n_prompts)),
    )
    if tokenizer is None:
        return prompts
    tokenized, answer_lengths, dropped = _tokenize(prompts, _check_tokenizer(tokenizer))
    multi = sorted((m for m, n in answer_lengths.items() if n > 1), key=vocabulary.index)
    if multi:
        warnings.warn(
            f"{prompts.task}: members {multi} take more than one token for {type(tokenizer).__name__}; "
            "prompts answering with them are scored on the first token only",
            SeqPromptWarning,
            stacklevel=2,
        )
    _warn_dropped(prompts, dropped, tokenizer)
    return tokenized


# ---------------------------------------------------------------------------------------------
# Behaviour: does the model continue the sequence?


def _right_pad(
    rows: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch"]]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_token_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return ids, lengths


def _tokenized_for(model: LoadedModel, prompts: SeqPromptSet) -> SeqPromptSet:
    if not prompts.is_tokenized:
        return tokenize_prompts(prompts, model.tokenizer)
    if prompts.tokenizer_key != _tokenizer_key(model.tokenizer):
        raise MechbookError(f"these {prompts.task} prompts were tokenized for another tokenizer than {model.name}'s; "
                            "call tokenize_prompts(prompts, model.tokenizer) on the untokenized set")
    return prompts


def score_prompts(
    model: LoadedModel, prompts: SeqPromptSet, *, ratio: float = 2.0, batch_size: int = 32
) -> pd.DataFrame:
    """Per prompt: p(corr), p(incorr), logit difference and top-1 token at the last position.

    One row per prompt (in the set's order, after tokenization drops); ``solved`` is
    the paper's criterion p(corr) > ``ratio`` x p(incorr). Prompts are batched with
    right padding, shortest first (:func:`mechbook.core.runs.run_last`).
    """
    prompts = _tokenized_for(model, prompts)
    if len(prompts) == 0:
        raise MechbookError(f"no {prompts.task} prompts left to score; drop counts: {_counts(prompts.drop_counts())}")
    order = sorted(range(len(prompts)), key=lambda k: len(prompts.prompt_ids[k]))
    corr_ids, incorr_ids = prompts.answer_tensors()
    columns: dict[str, list] = {"p_corr": [], "p_incorr": [], "logit_diff": [], "top1_id": [], "p_top1": []}
    with torch.inference_mode():
        for start in tqdm(chunk_starts(len(order), batch_size), desc=f"{prompts.task} {model.name}",
                          disable=None, leave=False):
            chunk = order[start : start + batch_size]
            logits = run_last(model, tokenize(model, [prompts.prompt_ids[k] for k in chunk]))[0].cpu()
            probs = logits.softmax(-1)
            rows = torch.arange(len(chunk))
            c, i = corr_ids[chunk], incorr_ids[chunk]
            top_p, top_id = probs.max(-1)
            columns["p_corr"] += probs[rows, c].tolist()
            columns["p_incorr"] += probs[rows, i].tolist()
            columns["logit_diff"] += (logits[rows, c] - logits[rows, i]).tolist()
            columns["top1_id"] += top_id.tolist()
            columns["p_top1"] += top_p.tolist()
    unsorted = pd.DataFrame(columns, index=order).sort_index()
    frame = prompts.to_frame()[["task", "kind", "template", "source_index", "text", "corr", "incorr",
                                "n_tokens", "corr_id", "incorr_id"]]
    frame.insert(0, "model", model.name)
    frame = pd.concat([frame, unsorted], axis=1)
    frame["top1_token"] = [model.tokenizer.decode([t]) for t in frame["top1_id"]]
    frame["top1_is_corr"] = frame["top1_id"] == frame["corr_id"]
    frame["solved"] = frame["p_corr"] > ratio * frame["p_incorr"]
    return frame


def filter_solved(
    model: LoadedModel,
    prompts: SeqPromptSet,
    *,
    ratio: float = 2.0,
    scores: pd.DataFrame | None = None,
    batch_size: int = 32,
) -> SeqPromptSet:
    """The prompts the model solves, p(corr) > ``ratio`` x p(incorr) (the paper's filter).

    Pass ``scores`` from :func:`score_prompts` to avoid a second run. The others go
    to ``.dropped`` with reason "not_solved"; an empty result raises.
    """
    ratio = check("ratio", ratio)
    prompts = _tokenized_for(model, prompts)
    if scores is None:
        scores = score_prompts(model, prompts, ratio=ratio, batch_size=batch_size)
    elif len(scores) != len(prompts) or list(scores["text"]) != prompts.text:
        raise MechbookError("scores do not belong to these prompts; compute them with "
                            "score_prompts(model, prompts) on the same (tokenized) set")
    solved = (scores["p_corr"] > ratio * scores["p_incorr"]).to_numpy()
    if not solved.any():
        raise MechbookError(
            f"{model.name} solves none of the {len(prompts)} {prompts.task}/{prompts.kind} prompts "
            f"(p(corr) > {ratio} x p(incorr)); mean p(corr) {scores['p_corr'].mean():.3f}, mean p(incorr) "
            f"{scores['p_incorr'].mean():.3f}, most common top-1 {scores['top1_token'].mode().iat[0]!r}; "
            f"{len(prompts.dropped)} were dropped earlier ({_counts(prompts.drop_counts())}). Try another template "
            "or task, a lower ratio, or a larger model"
        )
    failed = scores.loc[~solved]
    new_drops = pd.DataFrame({
        "source_index": failed["source_index"], "template": failed["template"], "text": failed["text"],
        "corr": failed["corr"], "incorr": failed["incorr"], "reason": "not_solved",
        "detail": [f"p_corr={a:.3f} p_incorr={b:.3f}" for a, b in zip(failed["p_corr"], failed["p_incorr"])],
    }, columns=_DROP_COLUMNS)  # fmt: skip
    kept = prompts.select(np.flatnonzero(solved).tolist())
    dropped = pd.concat([prompts.dropped, new_drops], ignore_index=True) if len(failed) else prompts.dropped
    return replace(kept, dropped=dropped)
