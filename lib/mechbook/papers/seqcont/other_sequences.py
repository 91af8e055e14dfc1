"""Knocking out the shared sub-circuit on prompts beyond the three tasks (Paper B: Lan, Torr & Barez 2024).

The paper finds one sub-circuit shared by the numerals, number-words and months
circuits, then asks what it does elsewhere: it ablates the sub-circuit on other
prompts that continue a pattern - interval sequences ("2 4 6" -> " 8"), Spanish
number words and months ("uno dos tres" -> " cuatro", "enero febrero marzo" ->
" abril") and short word problems - and compares with ablating random components.

Here *ablating a set of components* means mean-ablating them, at every position,
and nothing else (the complement of scoring a circuit): each head's output
(``hook_z``) and each MLP's output is replaced by its per-position mean over
corrupted prompts of the same form and token length. The new tasks have no
corrupted set in the paper, so one is built the way the paper builds its own:
the same templates with the members drawn at random (:func:`family_prompts` with
``corrupted=True``). The control is equal-size random sets of heads and MLPs
(:func:`mechbook.core.circuits.random_circuits`).

- :func:`family_prompts`: prompts of one family (clean or corrupted), untokenized;
- :func:`common_lengths`: the clean prompts at the token lengths that have corrupted
  means (mean ablation lines positions up);
- :func:`knockout_runs`: per prompt and condition (full model, shared sub-circuit
  ablated, each random set ablated): logit difference, top-1 hit, solved;
- :func:`knockout_summary`: accuracy and logit difference per condition, with the
  spread over the random sets.

The shared sub-circuit comes from chapter b4's results (or the intersection of
chapter b2's circuits): :func:`mechbook.book.saved_circuits.load_shared_circuit`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from mechbook.core.circuits import Circuit, digest, random_circuits
from mechbook.core.checks import check
from mechbook.core.errors import MechbookError
from mechbook.core.interventions import edit_hooks, mean_ablation
from mechbook.core.loading import LoadedModel
from mechbook.core.patching import all_heads, all_mlps, mean_activations
from mechbook.core.runs import run_variants, tokenize
from mechbook.papers.seqcont.sequences import (
    SeqPromptSet,
    make_prompts,
    sequence_members,
)

# --- the prompt families --------------------------------------------------------------------------

# (template, separator): a bare list ("2 4 6 8"), a comma list ("2, 4, 6, 8,") and the paper's "done" form.
SEQUENCE_FORMS = (("{member}", " "), ("{member}", ", "), ("done", " "))
INTERVAL_STEPS = (2, 3, 5, 10)
# family -> (generator task, steps, starts); "numerals" (step 1) is the reference: the circuits' own kind of sequence.
SEQUENCE_FAMILIES = {
    "numerals": ("numerals", (1,), tuple(range(1, 13))),
    "intervals": ("numerals", INTERVAL_STEPS, tuple(range(1, 13))),
    "spanish numbers": ("numwords_es", (1,), tuple(range(1, 17))),
    "spanish months": ("months_es", (1,), tuple(range(1, 9))),
}
WORD_PROBLEM_TEMPLATES = {
    "gets one more": "{name} has {n} {things}. {Pronoun} gets one more. Now {pronoun} has",
    "box": "There are {n} {things} in the box. I put in one more. Now there are",
    "next year": "{name} is {n} years old. Next year {pronoun} will be",
    "found one more": "{name} had {n} {things} and found one more, so now {pronoun} has",
}
WORD_PROBLEM_PEOPLE = (("Tom", "he"), ("Anna", "she"), ("Sam", "he"), ("Lucy", "she"), ("Ben", "he"), ("Mia", "she"))
WORD_PROBLEM_THINGS = ("apples", "books", "coins", "pens", "cards", "marbles", "cups", "stamps")
WORD_PROBLEM_NUMBERS = tuple(range(2, 9))  # answers 3..9: one digit (one token for digit-splitting tokenizers), plural nouns
FAMILIES = (*SEQUENCE_FAMILIES, "word problems")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise MechbookError(f"unknown prompt family {family!r}; known: {', '.join(FAMILIES)}")


def _fits(task: str, start: int, count: int, step: int) -> bool:
    """Whether ``count`` members of ``task`` from ``start`` in steps of ``step`` exist."""
    try:
        sequence_members(task, start, count, step)
    except MechbookError:
        return False
    return True


def _join(sets: Sequence[SeqPromptSet], task: str, kind: str) -> SeqPromptSet:
    """Untokenized prompt sets of different generator tasks as one set named ``task``, source rows renumbered."""
    fields = ("text", "members", "corr", "incorr", "template")
    joined = {f: [x for s in sets for x in getattr(s, f)] for f in fields}
    return SeqPromptSet(task=task, kind=kind, source_index=list(range(len(joined["text"]))), **joined)


def _unique(prompts: SeqPromptSet) -> SeqPromptSet:
    """The first occurrence of every prompt text (the bare forms repeat when there are few starts)."""
    seen: dict[str, int] = {}
    for k, text in enumerate(prompts.text):
        seen.setdefault(text, k)
    return prompts.select(sorted(seen.values()))


def word_problem_prompts(*, n_per_template: int = 16, corrupted: bool = False, seed: int = 0) -> SeqPromptSet:
    """Self-made one-step word problems: "Tom has 3 apples. He gets one more. Now he has" -> " 4" (incorr " 3").

    Four templates (``WORD_PROBLEM_TEMPLATES``), numbers 2..8, names and things drawn
    at random. ``corrupted=True`` draws the number shown at random from 2..9 with
    other fillers: the mean-ablation values average over the number, as the paper's
    corrupted sequences average over the members.
    """
    if n_per_template < 1:
        raise MechbookError(f"n_per_template must be at least 1 (got {n_per_template})")
    rng = np.random.default_rng([seed, 2 if corrupted else 3])
    texts, members, corr, incorr, templates = [], [], [], [], []
    for key, template in WORD_PROBLEM_TEMPLATES.items():
        for k in range(n_per_template):
            n = int(rng.integers(2, 10)) if corrupted else WORD_PROBLEM_NUMBERS[k % len(WORD_PROBLEM_NUMBERS)]
            name, pronoun = WORD_PROBLEM_PEOPLE[int(rng.integers(len(WORD_PROBLEM_PEOPLE)))]
            things = WORD_PROBLEM_THINGS[int(rng.integers(len(WORD_PROBLEM_THINGS)))]
            texts.append(template.format(name=name, n=n, things=things, pronoun=pronoun, Pronoun=pronoun.capitalize()))
            members.append((str(n),))
            corr.append(f" {n + 1}")
            incorr.append(f" {n}")
            templates.append(key)
    return SeqPromptSet(task="word problems", kind="corrupted" if corrupted else "clean", text=texts, members=members,
                        corr=corr, incorr=incorr, template=templates, source_index=list(range(len(texts))))


def family_prompts(family: str, *, corrupted: bool = False, n_members: int = 4, repeats: int = 1,
                   seed: int = 0) -> SeqPromptSet:
    """One family's prompts, untokenized: every start and step in each of ``SEQUENCE_FORMS`` (or the word problems).

    ``repeats`` > 1 draws more prompts of the "done" form (other objects) and, for
    the corrupted set, more random member draws. Clean sets hold each text once.
    Corrupted sets (``corrupted=True``) are the same forms with members resampled at
    random from the members the clean set uses (``make_prompts(corrupted="resample")``).
    """
    _check_family(family)
    repeats = check("corrupted_repeats", repeats, argument="repeats")
    n_members = check("n_members", n_members)
    if family == "word problems":
        return word_problem_prompts(n_per_template=len(WORD_PROBLEM_NUMBERS) * repeats, corrupted=corrupted, seed=seed)
    task, steps, starts = SEQUENCE_FAMILIES[family]
    parts = []
    for step in steps:
        fits = [s for s in starts if _fits(task, s, n_members + 1, step)]  # e.g. months only up to August
        if not fits:
            continue
        for template, separator in SEQUENCE_FORMS:
            copies = repeats if (corrupted or template == "done") else 1
            parts.append(make_prompts(task, template=template, separator=separator, n_prompts=len(fits) * copies,
                                      starts=fits, n_members=n_members, step=step, seed=seed + 7 * step,
                                      corrupted="resample" if corrupted else None))
    if not parts:
        raise MechbookError(f"no start of {family} fits {n_members} members and an answer; use fewer members")
    joined = _join(parts, family, "corrupted" if corrupted else "clean")
    return joined if corrupted else _unique(joined)


# --- ablating -------------------------------------------------------------------------------------


def _by_length(prompts: SeqPromptSet) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for k, n in enumerate(prompts.n_tokens):
        groups.setdefault(n, []).append(k)
    return dict(sorted(groups.items()))


def common_lengths(prompts: SeqPromptSet, corrupted: SeqPromptSet, *, n_lengths: int = 3,
                   min_corrupted: int = 4) -> SeqPromptSet:
    """The clean prompts at the ``n_lengths`` most common token lengths that have ``min_corrupted`` corrupted prompts.

    Mean ablation needs means at the same positions, so :func:`knockout_runs` runs
    one token length at a time (one mean pass and one batched pass each); keeping the
    common lengths bounds the cost, as the paper keeps one length per task.
    """
    n_lengths = check("n_lengths", n_lengths)
    min_corrupted = check("n_corrupted", min_corrupted, argument="min_corrupted")
    covered = {n for n, rows in _by_length(corrupted).items() if len(rows) >= min_corrupted}
    groups = sorted(((n, rows) for n, rows in _by_length(prompts).items() if n in covered),
                    key=lambda item: (-len(item[1]), item[0]))[:n_lengths]
    if not groups:
        raise MechbookError(f"no token length of the clean prompts has {min_corrupted} corrupted prompts; "
                            "build more corrupted prompts (family_prompts(corrupted=True, repeats=...))")
    return prompts.select(sorted(k for _, rows in groups for k in rows))


def knockout_runs(
    model: LoadedModel,
    prompts: SeqPromptSet,
    corrupted: SeqPromptSet,
    ablations: Mapping[str, Circuit],
    *,
    ratio: float = 2.0,
    max_rows: int = 128,
    values: Callable | None = None,
) -> pd.DataFrame:
    """Each prompt under each condition: nothing ablated ("full") and each named set of components mean-ablated.

    Prompts are run in groups of one token length, with means (every head and MLP
    output, per position) over the corrupted prompts of that length, so positions line
    up; clean prompts whose length no corrupted prompt has are left out (counted in
    ``attrs["no_means"]``). One row per condition x prompt: ``logit_diff`` (next member
    minus last shown), ``top1_is_corr`` (the next member's logit above every other:
    ``top1_margin`` > 0) and ``solved`` (p(corr) > ``ratio`` x p(incorr), that is
    ``logit_diff`` > log ``ratio``).

    A unit is one condition on one length group: its prompts' logit differences and
    top-1 margins. ``values(inputs, n, compute, labels=...)`` gets them (default: ``compute(
    list(range(n)))``); a chapter passes :meth:`mechbook.book.searches.Searches.values` to
    load and re-check committed ones.
    """
    if not prompts.is_tokenized or not corrupted.is_tokenized:
        raise MechbookError("tokenize both prompt sets first: tokenize_prompts(prompts, model.tokenizer)")
    if prompts.tokenizer_key != corrupted.tokenizer_key:
        raise MechbookError("the clean and corrupted prompts were tokenized for different tokenizers; "
                            "tokenize both with this model's tokenizer")
    if len(prompts) == 0 or len(corrupted) == 0:
        raise MechbookError(f"no prompts to run ({len(prompts)} clean, {len(corrupted)} corrupted); "
                            "check the drops of the prompt sets (.dropped) or generate more")
    if not ratio > 0:
        raise MechbookError(f"ratio must be positive (the paper's 2: p(corr) > 2 x p(incorr)); got {ratio!r}")
    for name, circuit in ablations.items():
        if name == "full":
            raise MechbookError('"full" names the unablated model; call the ablation something else')
        try:
            circuit.validate(model)
        except MechbookError as exc:
            raise MechbookError(f"ablation {name!r}: {exc}") from exc
    conditions = [("full", [])] + [(name, c.components) for name, c in ablations.items()]
    corr_ids, incorr_ids = prompts.answer_tensors()
    corrupted_groups = _by_length(corrupted)
    groups = [(length, rows) for length, rows in _by_length(prompts).items() if length in corrupted_groups]
    missing = sum(len(rows) for length, rows in _by_length(prompts).items() if length not in corrupted_groups)
    if not groups:
        raise MechbookError(f"no clean prompt has a token length that a corrupted prompt has ({sorted(_by_length(prompts))} "
                            f"vs {sorted(corrupted_groups)}); build more corrupted prompts (family_prompts(repeats=...))")
    items = [(g, v) for g in range(len(groups)) for v in range(len(conditions))]
    components = all_heads(model) + all_mlps(model)
    prepared: dict[int, tuple] = {}

    def group(g: int) -> tuple:
        if g not in prepared:
            length, rows = groups[g]
            means = mean_activations(model, tokenize(model, [corrupted.prompt_ids[i] for i in corrupted_groups[length]]),
                                     components)
            prepared[g] = (means, tokenize(model, [prompts.prompt_ids[i] for i in rows]), rows)
        return prepared[g]

    def compute(picked: list[int]) -> list[torch.Tensor]:
        """Each picked (length group, condition): [prompts, 2] of logit difference and top-1 margin."""
        out: dict[int, torch.Tensor] = {}
        for g in sorted({items[k][0] for k in picked}):
            means, batch, rows = group(g)
            ks = [k for k in picked if items[k][0] == g]
            chosen = [conditions[items[k][1]][1] for k in ks]
            n = len(rows)
            c, i = corr_ids[rows].to(model.device), incorr_ids[rows].to(model.device)
            idx = torch.arange(n, device=model.device)

            def hooks_for(first: int, count: int):
                edits = []
                for v, comps in enumerate(chosen[first : first + count]):
                    edits += mean_ablation(comps, means, rows=slice(v * n, (v + 1) * n))
                return edit_hooks(edits)

            def reduce(logits: torch.Tensor) -> torch.Tensor:
                """[variant, n, vocab] -> [variant, n, 2]: logit difference, margin of the next member over the rest."""
                logits = logits.float()
                right = logits[:, idx, c]
                others = logits.clone()
                others[:, idx, c] = -torch.inf
                return torch.stack([right - logits[:, idx, i], right - others.amax(-1)], dim=-1).cpu()

            stats = run_variants(model, batch, len(chosen), hooks_for, reduce, max_rows=max_rows)
            out.update({k: stats[j] for j, k in enumerate(ks)})
        return [out[k] for k in picked]

    inputs = {"prompts": [digest(torch.tensor([prompts.prompt_ids[i] for i in rows])) for _, rows in groups],
              "answers": digest(corr_ids, incorr_ids),
              "corrupted": [digest(torch.tensor([corrupted.prompt_ids[i] for i in corrupted_groups[length]]))
                            for length, _ in groups],
              "conditions": [[name, [x.label for x in comps]] for name, comps in conditions],
              "max_rows": int(max_rows)}
    labels = [f"{conditions[v][0]}, {groups[g][0]} tokens" for g, v in items]
    for g in range(len(groups)):  # the means first, whichever units are run: a check then costs only its runs
        group(g)
    found = (values(inputs, len(items), compute, labels=labels) if values is not None
             else compute(list(range(len(items)))))
    log_ratio = float(np.log(ratio))
    frames = []
    for (g, v), stats in zip(items, found):
        length, rows = groups[g]
        frames.append(pd.DataFrame({
            "condition": conditions[v][0],
            "prompt": rows,
            "n_tokens": length,
            "logit_diff": stats[:, 0].numpy(),
            "top1_margin": stats[:, 1].numpy(),
            "top1_is_corr": (stats[:, 1] > 0).numpy(),
            "solved": (stats[:, 0] > log_ratio).numpy(),
        }))  # fmt: skip
    out = pd.concat(frames, ignore_index=True)
    order = {name: k for k, (name, _) in enumerate(conditions)}
    out = out.sort_values(["condition", "prompt"], key=lambda s: s.map(order) if s.name == "condition" else s,
                          kind="stable").reset_index(drop=True)
    out.attrs["no_means"] = missing
    return out


def random_ablations(model: LoadedModel, shared: Circuit, n: int, seed: int = 0, *,
                     name: str = "random") -> dict[str, Circuit]:
    """``n`` random sets with as many heads and MLPs as ``shared``, named "<name> 0", "<name> 1", ...

    For a heads-only control pass ``Circuit(shared.heads, [])`` and e.g. ``name="random heads"``.
    """
    return {f"{name} {k}": c for k, c in enumerate(random_circuits(model, shared, n, seed=seed))}


def condition_kind(condition: str) -> str:
    """ "random 3" -> "random", "random heads 0" -> "random heads"; other conditions are their own kind."""
    head, _, tail = condition.rpartition(" ")
    return head if head.startswith("random") and tail.isdigit() else condition


def per_set_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per condition (each random set on its own): accuracy, solved fraction, mean logit difference, and their
    change from the full model; ``score`` is the mean logit difference in percent of the full model's."""
    if runs.empty:
        raise MechbookError("no runs to summarize; run knockout_runs first")
    table = runs.groupby("condition", sort=False).agg(
        accuracy=("top1_is_corr", "mean"),
        solved_fraction=("solved", "mean"),
        logit_diff=("logit_diff", "mean"),
        n_prompts=("prompt", "size"),
    ).reset_index()
    full = table.set_index("condition").loc["full"]
    table.insert(1, "kind", table["condition"].map(condition_kind))
    table["accuracy_drop"] = full["accuracy"] - table["accuracy"]
    table["score"] = 100.0 * table["logit_diff"] / full["logit_diff"] if full["logit_diff"] > 0 else np.nan
    return table


def knockout_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per kind of condition (full, shared, random): means, and for random sets the spread over sets.

    ``*_sd`` / ``*_min`` / ``*_max`` are over the random sets (0 for a single set).
    """
    table = per_set_table(runs)
    measures = ["accuracy", "solved_fraction", "logit_diff", "score", "accuracy_drop"]
    grouped = table.groupby("kind", sort=False)
    out = grouped[measures].mean()
    for m in ("accuracy", "logit_diff", "score"):
        out[f"{m}_sd"] = grouped[m].std(ddof=1).fillna(0.0)
    out["accuracy_min"] = grouped["accuracy"].min()
    out["accuracy_max"] = grouped["accuracy"].max()
    out["n_sets"] = grouped.size()
    out["n_prompts"] = grouped["n_prompts"].first()
    return out.reset_index().rename(columns={"kind": "condition"})
