"""The kept edges of the task circuits, counted (Paper B, section 3; chapter b3).

Edge pruning itself is :func:`mechbook.core.circuits.prune_edges`; this module counts
its kept edges per input type (:func:`edge_counts`). The diagram of the edges is
:func:`mechbook.papers.seqcont.figures.circuit_diagram`.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from mechbook.core.circuits import INPUTS
from mechbook.core.errors import MechbookError


def edge_counts(edges: pd.DataFrame, *, by: Sequence[str] = ("task",)) -> pd.DataFrame:
    """Tested and kept edges per input type (q, k, v, resid) and in total: one row per group x input."""
    by = list(by)
    missing = [c for c in [*by, "input", "kept"] if c not in edges.columns]
    if missing:
        raise MechbookError(f"the edge table lacks {', '.join(missing)}; pass the table of prune_edges "
                            "(with a task column when counting per task)")
    order = [i for i in INPUTS if i in set(edges["input"])]
    counts = (edges.assign(input=pd.Categorical(edges["input"], order + ["all"]))
              .groupby([*by, "input"], observed=True, sort=False)["kept"].agg(tested="size", kept="sum").reset_index())
    total = edges.groupby(by, sort=False)["kept"].agg(tested="size", kept="sum").reset_index().assign(input="all")
    out = pd.concat([counts, total], ignore_index=True)
    out["input"] = pd.Categorical(out["input"], order + ["all"])
    out = out.sort_values([*by, "input"], kind="stable", key=lambda s: s if s.name == "input" else s.map(
        {v: i for i, v in enumerate(dict.fromkeys(edges[s.name]))})).reset_index(drop=True)
    out["input"] = out["input"].astype(str)
    out["share_kept"] = out["kept"] / out["tested"]
    return out
