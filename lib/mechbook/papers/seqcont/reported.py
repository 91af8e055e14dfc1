"""The numbers Lan, Torr & Barez (2024) report, in one place (Paper B).

Chapters b1-b6 and the across-models chapter read them from here and always show
them marked as the paper's. The node circuits themselves ship as data files
(``data/<task>_gpt2small_circuit.json``, read by :func:`mechbook.papers.seqcont.sequences.paper_gpt2small_circuit`).
"""

from __future__ import annotations

import pandas as pd

# §4 (GPT-2 small): the circuit found on one task, scored on another, in % of the full model. The paper gives
# each circuit's scores on numerals and on number words; none on months.
CROSS_TASK = {
    ("numerals", "numerals"): 81.0, ("numerals", "numwords"): 48.4,
    ("numwords", "numerals"): 87.3, ("numwords", "numwords"): 81.1,
    ("months", "numerals"): 43.7, ("months", "numwords"): 32.4,
}
GPT2_SMALL_HEADS = 12 * 12
SHARED_HEADS = ((0, 1), (4, 4), (6, 1), (6, 6), (6, 10), (7, 11), (8, 8), (9, 1))
SHARED_MLPS = (0, 1, 2, 3, 4, 6, 7, 8, 9, 10)

_TASK_WORDS = {"numerals": "numerals", "numwords": "number words"}
NUMBERS = pd.DataFrame(
    [
        (f"circuit score on {_TASK_WORDS[on]} (%)", f"{circuit} circuit", "", "GPT-2 small (paper)", score,
         "Paper B, cross-task table")
        for (circuit, on), score in CROSS_TASK.items()
    ] + [
        ("circuit heads", "numerals", "", "GPT-2 small (paper)", 14, "Paper B circuit files"),
        ("circuit heads", "numwords", "", "GPT-2 small (paper)", 19, "Paper B circuit files"),
        ("circuit heads", "months", "", "GPT-2 small (paper)", 13, "Paper B circuit files"),
        ("heads in all three circuits", "all", "", "GPT-2 small (paper)", len(SHARED_HEADS),
         "Paper B: " + " ".join(f"{l}.{h}" for l, h in SHARED_HEADS)),
        ("MLPs in all three circuits", "all", "", "GPT-2 small (paper)", len(SHARED_MLPS), "Paper B: MLPs 0-4 and 6-10"),
    ],
    columns=["quantity", "task", "condition", "model", "value", "source"],
)
