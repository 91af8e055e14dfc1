"""Chapter wall times against the budgets, and the forward throughput behind them.

Two parts, one model:

- forward throughput on typical prompts (3-shot world-capitals prompts, as in chapter
  a1): tokens/s of ``mechbook.core.runs.run_last_batched`` (logits at each prompt's last
  position only) and of a plain transformer-lens bridge forward (logits at every
  position);
- the chosen chapters executed through the same code path as ``python -m mechbook run``
  (papermill, the venv's kernel, the chapter's parameters with ``model_name`` set), into
  a temporary folder: book/ is not touched, and ``MECHBOOK_RESULTS`` points the
  chapters' saved results to a temporary folder too, which starts with a copy of the
  committed results of the chapters not run, for the ones that read them (b7 alone reads
  b2's circuits) (``--in-place``: as ``python -m mechbook refresh`` does, into book/ and
  results/, so the timed run is the one committed). With ``--on-committed`` the
  temporary folder starts with the committed results of the chapters run too, as
  ``scripts/test.sh`` and a fresh clone's ``build_book.sh`` see them: chapters whose
  results hold their searches (b2, b3, b4, b6, b7: :mod:`mechbook.book.searches`) load and
  re-check them instead of searching again. Without it, every chapter run here computes.
  Each chapter's wall time is printed, then each paper's total against its budget on
  gemma3-270m (Paper A, all chapters: 10 min; Paper B, b1-b6: 20 min), and the total of
  every chapter against the budget of a full rerun on smollm2-135m (30 min).

Usage:

    python benchmarks/chapter_times.py                        # gemma3-270m, every a* chapter
    python benchmarks/chapter_times.py --chapters a1 a2       # some chapters
    python benchmarks/chapter_times.py --chapters b1 b2 b3 b4 b5 b6 --model smollm2-135m
    python benchmarks/chapter_times.py --skip-throughput --keep runs/timed   # keep the executed notebooks
    python benchmarks/chapter_times.py --skip-throughput --chapters b2 b3 --in-place  # refresh, timed
    python benchmarks/chapter_times.py --skip-throughput --chapters b2 b3 b4 b5 b6 b7 --on-committed  # as CI runs them
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

# Budgets of the issue, for the default model: a paper's chapters together, in seconds.
BUDGETS_SECONDS = {"a": 10 * 60, "b": 20 * 60}
BUDGET_MODEL = "gemma3-270m"
PAPER_B_BUDGETED = ("b1", "b2", "b3", "b4", "b5", "b6")  # b7, the stability study, is outside the budget
# A rerun of every chapter on the second packaged model.
FULL_RERUN_MODEL, FULL_RERUN_SECONDS = "smollm2-135m", 30 * 60
THROUGHPUT_PROMPTS = 32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--model", default=BUDGET_MODEL, help=f"model to run (default {BUDGET_MODEL})")
    parser.add_argument("--chapters", nargs="+", metavar="KEY",
                        help="chapter keys or file stems (default: every Paper A chapter, a*)")
    parser.add_argument("--prompts", type=int, default=THROUGHPUT_PROMPTS,
                        help=f"prompts in the throughput batch (default {THROUGHPUT_PROMPTS})")
    parser.add_argument("--skip-throughput", action="store_true", help="only time the chapters")
    parser.add_argument("--skip-chapters", action="store_true", help="only measure the throughput")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="write the executed notebooks and results here instead of a deleted temporary folder")
    parser.add_argument("--in-place", action="store_true",
                        help="execute as `python -m mechbook refresh` does: the default model only, outputs into "
                             "book/ and results into results/ (what gets committed)")
    parser.add_argument("--on-committed", action="store_true",
                        help="start from the committed results of the chapters run too: their searches are loaded and "
                             "re-checked, as in CI, instead of computed")
    args = parser.parse_args(argv)
    if args.prompts < 1:
        parser.error("--prompts must be at least 1")
    if args.in_place and (args.keep is not None or args.model != BUDGET_MODEL):
        parser.error(f"--in-place refreshes the book's own outputs: only with the default model "
                     f"({BUDGET_MODEL}) and without --keep")
    return args


def timed(fn, *args, **kwargs):
    """Result, wall-clock seconds and CPU seconds of this process."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def throughput(model_name: str, n_prompts: int) -> None:
    """Tokens/s of last-position logits (run_last_batched) and of full logits (bridge forward)."""
    import torch

    import mechbook
    from mechbook.core.runs import run_last_batched, tokenize
    from mechbook.papers.vector_arithmetic.prompts import build_prompts

    model, load_wall, _ = timed(mechbook.load_model, model_name)
    with contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prompts = build_prompts("capitals", model, n=n_prompts, seed=0, n_shots=3)
    batch = tokenize(model, prompts.token_ids)
    n, pos = batch.input_ids.shape
    tokens = int(batch.lengths.sum())
    print(f"model {model.name}: loaded in {load_wall:.1f} s; throughput batch: {n} three-shot capitals prompts, "
          f"{tokens} tokens ({pos} padded positions each); torch threads {torch.get_num_threads()}")
    run_last_batched(model, batch.select(slice(0, 4)))  # warm-up
    _, wall, cpu = timed(run_last_batched, model, batch)
    print(f"  run_last_batched (last-position logits): {wall:.2f} s wall, {tokens / wall:,.0f} tokens/s "
          f"({tokens / cpu:,.0f} per CPU second)")
    mask = (torch.arange(pos)[None, :] < batch.lengths[:, None]).long()
    with torch.inference_mode():
        _, wall, cpu = timed(model.bridge, batch.input_ids, attention_mask=mask)
    print(f"  bridge forward (logits at every position): {wall:.2f} s wall, {tokens / wall:,.0f} tokens/s "
          f"({tokens / cpu:,.0f} per CPU second)")


def time_chapters(model_name: str, wanted: list[str] | None, keep: Path | None, in_place: bool = False,
                  on_committed: bool = False) -> int:
    """Execute the chapters as `mechbook run` does, into a temporary folder; print times against the budgets."""
    from mechbook.book import cli
    from mechbook.book import results as results_mod

    root = cli.find_root()
    book_dir = root / "book"
    chapters = cli.select_chapters(book_dir, wanted or [c.key for c in cli.find_chapters(book_dir) if c.key[0] == "a"])
    if in_place:  # the code path of `mechbook refresh`: default parameters, volatile metadata stripped
        print(f"\nexecuting {', '.join(c.key for c in chapters)} on {model_name} in place (book/ and results/)")
        results = cli.run_chapters(chapters, book_dir=book_dir, out_dir=None, parameters=None, strip=True,
                                   stop_on_failure=False)
        return report(model_name, results)
    with contextlib.ExitStack() as stack:
        out = keep if keep is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chapter-times-")))
        out.mkdir(parents=True, exist_ok=True)
        os.environ[results_mod.RESULTS_ENV] = str(out / "results")  # the kernels inherit it: results/ stays untouched
        borrowed = borrow_results(root / "results", out / "results", model_name,
                                  [] if on_committed else [c.key for c in chapters])
        if borrowed:
            print(f"committed results copied for the chapters to read{' and check' if on_committed else ''}: "
                  f"{', '.join(borrowed)}")
        print(f"\nexecuting {', '.join(c.key for c in chapters)} on {model_name} into {out}")
        results = cli.run_chapters(chapters, book_dir=book_dir, out_dir=out / "runs",
                                   parameters=cli.chapter_parameters(chapters, model_name, []), strip=False,
                                   stop_on_failure=False)
    return report(model_name, results)


def borrow_results(source: Path, target: Path, model_name: str, running: list[str]) -> list[str]:
    """Copy the committed results of ``model_name``'s chapters that are not run here into ``target``.

    Later chapters read earlier ones' results (b3, b4, b6 and b7 read b2's circuits and
    prompts), as ``scripts/test.sh`` lets them. A chapter run here writes its own, so
    its committed copy is never borrowed and never stands in for a failed run. Returns
    the borrowed chapters' keys.
    """
    from mechbook.book import results as results_mod

    folder = results_mod.safe_name(model_name)
    borrowed = []
    runs = results_mod.complete_runs(source) if source.is_dir() else {}  # no results folder: nothing to borrow
    for chapter in runs.get(model_name, []):  # complete and intact only
        key = results_mod.CHAPTER_FOLDER.match(chapter)["key"]
        if key not in running:
            shutil.copytree(source / folder / chapter, target / folder / chapter, dirs_exist_ok=True)
            borrowed.append(key)
    return borrowed


def report(model_name: str, results: list) -> int:
    """Each chapter's status and time, each paper's total against its budget; 0 if every chapter ran."""
    from mechbook.book import cli

    rows = [(r.chapter, r.status if r.status == "ok" else r.status[:60], f"{r.seconds:.1f}") for r in results]
    print(cli.format_table(rows, ("chapter", "status", "seconds")))
    for paper in sorted({r.chapter[0] for r in results}):
        done = [r for r in results if r.chapter[0] == paper and (paper != "b" or r.chapter[:2] in PAPER_B_BUDGETED)]
        total = sum(r.seconds for r in done)
        budget = BUDGETS_SECONDS.get(paper)
        line = f"Paper {paper.upper()}: {len(done)} chapter(s), {total:.0f} s ({total / 60:.1f} min)"
        if budget is not None:
            line += f"; budget for all of its chapters on {BUDGET_MODEL}: {budget / 60:.0f} min"
            if model_name == BUDGET_MODEL:
                line += " -> " + ("within" if total <= budget else f"OVER by {total - budget:.0f} s")
        print(line)
    total = sum(r.seconds for r in results)
    line = f"every chapter run here: {len(results)} chapter(s), {total:.0f} s ({total / 60:.1f} min)"
    if model_name == FULL_RERUN_MODEL:
        line += f"; budget for a full rerun on {FULL_RERUN_MODEL}: {FULL_RERUN_SECONDS / 60:.0f} min -> " + (
            "within" if total <= FULL_RERUN_SECONDS else f"OVER by {total - FULL_RERUN_SECONDS:.0f} s")
    print(line)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average (1 min) at the end: {load:.1f} on {os.cpu_count()} CPUs: times on a loaded machine are longer")
    return 0 if all(r.status == "ok" for r in results) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from mechbook.book.cli import check_model_name

    check_model_name(args.model)
    if not args.skip_throughput:
        throughput(args.model, args.prompts)
    if args.skip_chapters:
        return 0
    return time_chapters(args.model, args.chapters, args.keep, args.in_place, args.on_committed)


if __name__ == "__main__":
    sys.exit(main())
