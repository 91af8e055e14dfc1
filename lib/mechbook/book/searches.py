"""Searched once, checked on every run: a chapter's costly searches, computed once and re-checked after.

A node pruning, an edge pruning or the scores of many circuits cost many forward passes
to find and one pass per unit to check: a pruning's log fixes the circuit before each
decision, so any decision can be recomputed alone
(:mod:`mechbook.core.pruning_checks`), and each circuit's score is a unit of its own.

:class:`Searches` runs a chapter's searches, one named unit of work each. A chapter
with complete results for the model (under the results root) whose ``searches.json``
holds a unit made from the same inputs (the prompts' and means' digests, threshold,
circuit, ...) with the locked package versions (the lock's sha256, and this venv equal
to the lock) does not search again: it loads the unit and re-checks a fixed sample of
it, at most a tenth of the search's cost, and stops with a one-line error naming every
unit that does not agree. Anything else is computed (``recompute=True``, or the
environment variable ``MECHBOOK_RECOMPUTE=1`` that ``mechbook run --recompute`` sets,
computes everything). :meth:`Searches.save` publishes the units with the chapter's
results, each with when, where and how long it was computed; the marker records
whether this run computed or checked them (:func:`mechbook.book.provenance.box` shows
it).

A unit being computed checkpoints as it goes under
``<results root>/<model>/_checkpoints/<chapter>/``: a node pruning after every decision,
any other unit when it ends. ``mechbook run --resume`` (``MECHBOOK_RESUME=1``) takes
them up; without it a run starts afresh. The checkpoints go when the chapter publishes.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from mechbook.book import lock
from mechbook.book.results import ChapterResults, chapter_file, default_root, is_complete, safe_name
from mechbook.core.circuits import (FLOAT_NOISE, Circuit, circuit_metrics, digest, means_fingerprint, prune_edges,
                                    prune_nodes, pruning_parameters, same_means, write_atomically)
from mechbook.core.errors import MechbookError
from mechbook.core.loading import LoadedModel
from mechbook.core.path_patching import QKV
from mechbook.core.pruning_checks import (BUDGET, assert_agrees, check_edge_decisions, check_node_decisions,
                                          check_row, checks_table, log_seed, node_material, sample_units)
from mechbook.core.runs import TokenBatch

RECORD = "searches"  # searches.json among the chapter's results
FORMAT = "mechbook searches 1"
RECOMPUTE_ENV = "MECHBOOK_RECOMPUTE"
RESUME_ENV = "MECHBOOK_RESUME"
CHECKPOINTS = "_checkpoints"  # <results root>/<model>/_checkpoints/<chapter>/: no chapter folder's name
NODE_COLUMNS = ["round", "pass", "step", "component", "kind", "layer", "head", "score_without", "removed",
                "circuit_size"]
# From this many prompts on, a node pruning publishes every prompt's metric under its sampled decisions
# (pruning_checks.node_material, computed once after the search) and later runs check a sample of the prompts:
# at the paper's 512, one forward pass of every prompt per sampled decision would pass CI's budget.
MATERIAL_FROM = 256
REPORT_COLUMNS = ["unit", "kind", "outcome", "checked", "of", "agree", "at threshold", "computed in (s)"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes")


def _plain(value: Any) -> Any:
    """JSON-able plain Python values (numpy and pandas scalars, tuples) for a unit's record."""
    return json.loads(json.dumps(value, default=_scalar))


def _scalar(value: Any) -> Any:
    if value is pd.NA:
        return None
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot record {type(value).__name__} in a search's record")


def _records(frame: pd.DataFrame) -> list[dict]:
    rows = []
    for row in frame.to_dict("records"):
        rows.append({k: (None if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)) else v)
                     for k, v in row.items()})
    return _plain(rows)


def _same_inputs(recorded: Any, inputs: dict) -> bool:
    """A unit's recorded inputs are these: every value equal, the means within float noise (:func:`same_means`)."""
    inputs = _plain(inputs)
    if not isinstance(recorded, dict) or set(recorded) != set(inputs):
        return False
    return all(same_means(recorded[k], v) if k == "means" else recorded[k] == v for k, v in inputs.items())


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _stamp(seconds: float) -> dict[str, Any]:
    """When, where and at which commit a unit was computed, and how long it took."""
    from mechbook.book import provenance

    git = provenance.git_state()
    cpu = provenance.cpu()
    return {"finished": _utc_now(), "seconds": round(float(seconds), 1), "commit": git.get("commit"),
            "dirty": git.get("dirty"), "cpu": cpu.get("name"), "threads": cpu.get("torch_threads")}


class Searches:
    """The costly searches of one chapter on one model: computed, or loaded from its results and re-checked.

    Call one method per unit, each with a key unique in the chapter
    (:meth:`node_pruning`, :meth:`edge_pruning`, :meth:`circuit_metrics`), then
    :meth:`save` with the chapter's :class:`~mechbook.book.results.ChapterResults`
    before ``finish()``. :meth:`report` is one row per unit: computed or checked, how
    many of its decisions or values were re-checked and how they came out.
    """

    def __init__(self, chapter: str, model: LoadedModel, *, recompute: bool = False,
                 root: str | Path | None = None) -> None:
        self.chapter, self.model = chapter, model
        self.root = Path(root) if root else default_root()
        self.recompute = bool(recompute) or _flag(RECOMPUTE_ENV)
        self.resume = _flag(RESUME_ENV)
        self.lock = lock.lock_sha256()
        self.units: dict[str, dict] = {}
        self.rows: list[dict] = []
        self.checks: dict[str, pd.DataFrame] = {}
        self.check_seconds = 0.0
        self.committed, self.why_not = self._committed()
        self.checkpoints = self.root / safe_name(model.name) / CHECKPOINTS / chapter
        if not self.resume and self.checkpoints.exists():
            shutil.rmtree(self.checkpoints, ignore_errors=True)

    # --- what the committed results hold ---------------------------------------------------------------

    def _committed(self) -> tuple[dict[str, dict], str]:
        """The committed units this run may check instead of computing, or why there are none."""
        if self.recompute:
            return {}, "recompute asked for"
        if not is_complete(self.model.name, self.chapter, self.root):
            return {}, f"no complete results of {self.chapter} for {self.model.name}"
        try:  # the results are complete and intact (is_complete): the only refusal left is a marker without the file
            path = chapter_file(self.chapter, f"{RECORD}.json", self.model.name, self.root)
        except MechbookError:
            return {}, "the committed results hold no searches"
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            return {}, f"the committed searches are of another format ({record.get('format')!r})"
        if self.lock is None or record.get("lock") != self.lock:
            return {}, "the committed searches were made with another lock"
        differs = lock.check()
        if differs:
            return {}, f"this venv is not the lock ({differs})"
        return dict(record.get("units", {})), ""

    def _reusable(self, key: str, kind: str, inputs: dict) -> dict | None:
        unit = self.committed.get(key)
        return unit if unit is not None and unit.get("kind") == kind and _same_inputs(unit.get("inputs"), inputs) \
            else None

    def _start(self, key: str) -> None:
        if not isinstance(key, str) or not key or key in self.units:
            raise MechbookError(f"search key {key!r} is empty or used twice in {self.chapter}; give each unit its own")

    def _unit(self, key: str, kind: str, inputs: dict, *, compute: Callable[[], dict],
              rebuild: Callable[[dict], Any], check: Callable[[Any], pd.DataFrame]) -> Any:
        """One unit: the committed one re-checked, one a killed run finished (``--resume``), or computed now.

        ``compute()`` gives the unit's record (its log or values; with ``"seconds"``, the unit's wall
        time when its work spans runs, as a resumed pruning's does), ``rebuild(unit)`` what the
        chapter gets from a record, ``check(rebuilt)`` the check's table (one row per unit re-checked).
        """
        self._start(key)
        unit = self._reusable(key, kind, inputs)
        if unit is not None:
            found = rebuild(unit)
            began = time.perf_counter()
            table = check(found)
            self._checked(key, unit, table, kind, time.perf_counter() - began)
            return found
        unit = self._finished_before(key, kind, inputs)
        if unit is not None:
            self._computed(key, unit, resumed=True)
            return rebuild(unit)
        began = time.perf_counter()
        record = compute()
        seconds = record.pop("seconds", time.perf_counter() - began)
        unit = {"kind": kind, "inputs": _plain(inputs), **record, "computed": _stamp(seconds)}
        self._computed(key, unit)
        return rebuild(unit)

    def _checkpoint(self, key: str, suffix: str) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        return self.checkpoints / f"{key.replace('/', '--')}.{suffix}.json"

    def _finished_before(self, key: str, kind: str, inputs: dict) -> dict | None:
        """A unit that an earlier, killed run of this chapter finished (``--resume`` only)."""
        path = self._checkpoint(key, "unit")
        if not self.resume or not path.is_file():
            return None
        try:
            unit = json.loads(path.read_text())
        except ValueError:
            return None
        return unit if unit.get("kind") == kind and _same_inputs(unit.get("inputs"), inputs) else None

    def _computed(self, key: str, unit: dict, *, resumed: bool = False) -> None:
        self.units[key] = unit
        if not resumed:
            write_atomically(self._checkpoint(key, "unit"), json.dumps(unit))
        self.rows.append({"unit": key, "kind": unit["kind"], "outcome": "resumed" if resumed else "computed",
                          "checked": None, "of": unit.get("size"), "agree": None, "at threshold": None,
                          "computed in (s)": unit["computed"]["seconds"]})

    def _checked(self, key: str, unit: dict, table: pd.DataFrame, what: str, seconds: float) -> None:
        assert_agrees(table, f"{self.chapter}: the committed {what} {key!r} ({self.model.name})")
        self.units[key] = unit
        self.checks[key] = table
        self.check_seconds += seconds
        sampled = table[table["check"].isin(["score_without", "score", "value", "solved"])]
        self.rows.append({"unit": key, "kind": unit["kind"], "outcome": "checked", "checked": len(sampled),
                          "of": unit.get("size"), "agree": int((sampled["status"] == "agrees").sum()),
                          "at threshold": int((sampled["status"] == "at threshold").sum()),
                          "computed in (s)": unit["computed"]["seconds"]})

    # --- node pruning -----------------------------------------------------------------------------------

    def node_pruning(self, key: str, batch: TokenBatch, means: Mapping[str, Tensor], metric, *, threshold: float,
                     max_rounds: int | None = None, tokens: Tensor | None = None, start: Circuit | None = None,
                     max_rows: int = 64) -> Circuit:
        """:func:`~mechbook.core.circuits.prune_nodes`, or its committed log re-checked
        (:func:`~mechbook.core.pruning_checks.check_node_decisions`). Either way the circuit with its score and log."""
        start = Circuit.full(self.model) if start is None else start
        inputs = pruning_parameters(self.model, batch, means, threshold=threshold, max_rounds=max_rounds, start=start,
                                    max_rows=max_rows, tokens=tokens)

        large = len(batch) >= MATERIAL_FROM

        def compute() -> dict:
            decisions = self._checkpoint(key, "decisions")
            found = prune_nodes(self.model, batch, means, metric, threshold=threshold, max_rounds=max_rounds,
                                start=start, max_rows=max_rows, tokens=tokens, checkpoint=decisions)
            seconds = json.loads(decisions.read_text())["seconds"]  # over every run that worked on it
            return {"seconds": seconds, "size": len(found.log),
                    "attrs": _plain({k: v for k, v in found.log.attrs.items() if k not in inputs}),
                    "rows": _records(found.log), "circuit": {**found.to_dict(), "score": found.score}}

        def check(found: Circuit) -> pd.DataFrame:
            return check_node_decisions(self.model, batch, means, metric, found, threshold=threshold,
                                        max_rows=max_rows, tokens=tokens,
                                        material=self.committed[key].get("material") if large else None)

        found = self._unit(key, "node pruning", inputs, compute=compute, rebuild=_node_circuit, check=check)
        unit = self.units[key]
        checked = self.rows[-1]["outcome"] == "checked"  # a committed unit is republished as it was
        if large and not checked and "material" not in unit:  # computed here, or a killed run's: with its prompt values
            unit["material"] = node_material(self.model, batch, means, metric, found.log, max_rows=max_rows,
                                             tokens=tokens)
            write_atomically(self._checkpoint(key, "unit"), json.dumps(unit))
        return found

    # --- edge pruning -----------------------------------------------------------------------------------

    def edge_pruning(self, key: str, batch: TokenBatch, circuit: Circuit, means: Mapping[str, Tensor], metric, *,
                     threshold: float, mlp_senders: bool = False, inputs_of: Sequence[str] = QKV,
                     to_logits: bool = True, source: TokenBatch | None = None, tokens: Tensor | None = None,
                     max_rows: int = 256) -> pd.DataFrame:
        """:func:`~mechbook.core.circuits.prune_edges`, or its committed table re-checked
        (:func:`~mechbook.core.pruning_checks.check_edge_decisions`). Either way the table with its attrs."""
        inputs = {"model": self.model.name, "threshold": float(threshold), "circuit": circuit.to_dict(),
                  "inputs": list(inputs_of), "mlp_senders": bool(mlp_senders), "to_logits": bool(to_logits),
                  "max_rows": int(max_rows), "prompts": digest(batch.input_ids, batch.lengths),
                  "source": None if source is None else digest(source.input_ids, source.lengths),
                  "means": means_fingerprint(means),
                  "tokens": None if tokens is None else [int(t) for t in tokens.tolist()]}
        def compute() -> dict:
            edges = prune_edges(self.model, batch, circuit, means, metric, threshold=threshold, source=source,
                                inputs=inputs_of, mlp_senders=mlp_senders, to_logits=to_logits, max_rows=max_rows,
                                tokens=tokens)
            return {"size": len(edges), "attrs": _plain(edges.attrs), "columns": list(edges.columns),
                    "rows": _records(edges)}

        def check(edges: pd.DataFrame) -> pd.DataFrame:
            return check_edge_decisions(self.model, batch, means, metric, edges, threshold=threshold, source=source,
                                        circuit=circuit, max_rows=max_rows, tokens=tokens)

        return self._unit(key, "edge pruning", inputs, compute=compute, rebuild=_edge_table, check=check)

    # --- many equally costly values ---------------------------------------------------------------------

    def values(self, key: str, inputs: dict, n: int, compute: Callable[[list[int]], Sequence[Tensor]], *,
               labels: Sequence[str] | None = None) -> list[Tensor]:
        """``n`` values of equal cost (each a tensor, e.g. one circuit's metric on every prompt): ``compute(list(range(
        n)))``, or the committed ones with a fixed sample recomputed (:func:`value_sample`) and compared element by
        element within float noise. ``inputs`` are exactly what the values are made from (prompts, circuits, ...);
        the values are reused only for the same inputs."""
        inputs = {"model": self.model.name, **inputs, "n": int(n)}
        labels = list(labels) if labels is not None else [str(i) for i in range(n)]

        def compute_all() -> dict:
            found = [v.float().cpu() for v in compute(list(range(n)))]
            if len(found) != n:
                raise MechbookError(f"compute gave {len(found)} values for {n} items in unit {key!r}; give one each")
            return {"size": n, "values": [v.tolist() for v in found]}

        def check(values: list[Tensor]) -> pd.DataFrame:
            picked = value_sample(n, seed=log_seed(pd.DataFrame({"label": labels}), ["label"]))
            return _value_checks(values, [v.float().cpu() for v in compute(picked)], picked, labels)

        return self._unit(key, "values", inputs, compute=compute_all, check=check,
                          rebuild=lambda unit: [torch.tensor(v, dtype=torch.float32) for v in unit["values"]])

    def circuit_metrics(self, key: str, batch: TokenBatch, circuits: Sequence[Circuit], means: Mapping[str, Tensor],
                        metric, *, tokens: Tensor | None = None, max_rows: int = 256) -> Tensor:
        """:func:`~mechbook.core.circuits.circuit_metrics` (each circuit's metric on each prompt, everything outside it
        mean-ablated) as :meth:`values`, one value per circuit: computed, or committed and a sample recomputed."""
        inputs = {"circuits": [c.to_dict() for c in circuits], "prompts": digest(batch.input_ids, batch.lengths),
                  "means": means_fingerprint(means),
                  "tokens": None if tokens is None else [int(t) for t in tokens.tolist()], "max_rows": int(max_rows)}

        def compute(picked: list[int]) -> Tensor:
            return circuit_metrics(self.model, batch, [circuits[i] for i in picked], means, metric,
                                   max_rows=max_rows, tokens=tokens)

        labels = [f"circuit {i}: {' '.join(c.labels()) or 'empty'}" for i, c in enumerate(circuits)]
        return torch.stack(self.values(key, inputs, len(circuits), compute, labels=labels))

    # --- a draw of inputs ---------------------------------------------------------------------------------

    def drawn(self, key: str, inputs: dict, *, draw: Callable[[], Any], record: Callable[[Any], dict],
              rebuild: Callable[[dict], Any], check: Callable[[Any], pd.DataFrame]) -> Any:
        """A costly draw of a search's inputs (e.g. prompts the model solves, found by scoring many): ``draw()``, or
        the committed (or, with ``--resume``, checkpointed) record rebuilt and, when committed, checked.

        ``record(drawn)`` is what fixes the draw (say, the rows chosen; its ``size``, if given, how many choices
        the draw made, is the report's "of"), ``rebuild(record)`` makes it again
        without the costly part, ``check(rebuilt)`` re-scores a sample of its choices (a check's table).
        ``inputs`` are what the draw is made from (sizes, seed, ...)."""
        made: dict[str, Any] = {}

        def compute() -> dict:
            made["value"] = draw()
            kept = _plain(record(made["value"]))
            return {"size": kept.pop("size", None), "record": kept}

        def again(unit: dict) -> Any:
            return made.pop("value") if "value" in made else rebuild(unit["record"])

        return self._unit(key, "draw", {"model": self.model.name, **inputs}, compute=compute, rebuild=again,
                          check=check)

    # --- reporting and publishing -----------------------------------------------------------------------

    @property
    def outcome(self) -> str:
        """``computed`` (every unit), ``checked`` (every unit), or ``computed and checked``."""
        kinds = {"checked" if r["outcome"] == "checked" else "computed" for r in self.rows}
        return " and ".join(sorted(kinds)) if kinds else "no searches"

    def report(self) -> pd.DataFrame:
        """One row per unit: computed or checked; units re-checked of all, how many agree or sit at the threshold."""
        table = pd.DataFrame(self.rows, columns=REPORT_COLUMNS)
        for c in ("checked", "of", "agree", "at threshold"):
            table[c] = table[c].astype("Int64")
        return table.set_index("unit")

    def summary(self) -> str:
        """One sentence: what this run computed or checked, and the check's time (for the chapter to print)."""
        from mechbook.book.provenance import how_many

        checked = [r for r in self.rows if r["outcome"] == "checked"]
        computed = [r for r in self.rows if r["outcome"] != "checked"]
        parts = []
        if checked:
            n = sum(r["checked"] for r in checked)
            at = sum(r["at threshold"] for r in checked)
            parts.append(f"checked {how_many(checked)} ({n} units re-computed, all agree"
                         + (f", {at} at the threshold within float noise, which no CPU can decide" if at else "")
                         + f"); computing them took {sum(r['computed in (s)'] for r in checked):.1f} s, "
                         f"re-checking took {self.check_seconds:.1f} s")
        if computed:
            parts.append(f"computed {how_many(computed, committed=False)} "
                         f"({self.why_not or 'no committed unit with these inputs'})")
        return "; ".join(parts) + "." if parts else "no searches."

    def save(self, saved: ChapterResults) -> None:
        """Stage ``searches.json`` with ``saved``'s results and record in its marker what this run computed or
        checked; the checkpoints go once the results are published."""
        if saved.chapter != self.chapter or saved.model_name != self.model.name:
            raise MechbookError(f"these searches are {self.chapter} on {self.model.name}, the results "
                                f"{saved.chapter} on {saved.model_name}; save each into its own chapter's results")
        saved.save(RECORD, {"format": FORMAT, "lock": self.lock, "units": self.units})
        saved.extra["searches"] = {
            "outcome": self.outcome,
            "units": [{k: r[k] for k in ("unit", "kind", "outcome", "checked", "of", "agree", "at threshold")}
                      for r in self.rows],
            "check_seconds": round(self.check_seconds, 1),
            "computed": {key: unit["computed"] for key, unit in self.units.items()},
            "why_computed": self.why_not if any(r["outcome"] != "checked" for r in self.rows) else "",
        }
        saved.after_publish.append(lambda: shutil.rmtree(self.checkpoints, ignore_errors=True))


# --- units back from their records ----------------------------------------------------------------------


def _node_circuit(unit: dict) -> Circuit:
    log = pd.DataFrame(unit["rows"], columns=NODE_COLUMNS)
    log.attrs.update({**unit["inputs"], **unit["attrs"]})
    log.attrs["seconds"] = unit["computed"]["seconds"]
    c = unit["circuit"]
    return Circuit([tuple(h) for h in c["heads"]], list(c["mlps"]), score=c["score"], log=log)


def _edge_table(unit: dict) -> pd.DataFrame:
    edges = pd.DataFrame(unit["rows"], columns=unit["columns"])
    for column in ("sender_head", "receiver_head"):
        edges[column] = edges[column].astype("Int64")
    edges["kept"] = edges["kept"].astype(bool)
    edges.attrs.update(unit["attrs"])
    return edges


def value_sample(n: int, *, seed: int) -> list[int]:
    """Which of ``n`` equally costly values to recompute: the first, the last and a spread within a twentieth of ``n``
    (:data:`~mechbook.core.pruning_checks.BUDGET`: a tenth of the wall time, with room for each run's own overhead)."""
    return sample_units([False] * n, seed, lambda s: BUDGET * len(s) <= n)


def _value_checks(logged: Sequence[Tensor], again: Sequence[Tensor], picked: Sequence[int],
                  names: Sequence[str]) -> pd.DataFrame:
    """One row per recomputed value (its mean shown), every element compared within float noise of the largest."""
    rows = []
    for k, i in enumerate(picked):
        a, b = logged[i], again[k]
        worst = float((a - b).abs().max()) if a.shape == b.shape else math.inf
        tol = FLOAT_NOISE * max(1.0, float(a.abs().max()), float(b.abs().max()) if a.shape == b.shape else 0.0)
        status = "agrees" if worst <= tol and bool(torch.isfinite(b).all()) else "differs"
        rows.append(check_row(names[i], "value", float(a.float().mean()), float(b.float().mean()),
                         status=status, note="" if status == "agrees" else f"a prompt's value moved by {worst:.3g}"))
    return checks_table(rows, {"rows_checked": list(picked)})
