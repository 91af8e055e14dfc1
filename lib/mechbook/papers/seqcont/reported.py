"""The numbers Lan, Torr & Barez (2024) report, in one place (Paper B).

Chapters b1-b6 and the across-models chapter read them from here and always show
them marked as the paper's. Each row's ``source`` names where it comes from: the paper
(EMNLP 2024, arXiv 2311.04131; the book's references.bib key ``lan2024``) or its code
release (github.com/apartresearch/seqcont_circuits). "table/figure not checked" marks a
number whose table or figure in the paper the book's authors could not verify. The node
circuits themselves ship as data files (``data/<task>_gpt2small_circuit.json``, read by
:func:`mechbook.papers.seqcont.sequences.paper_gpt2small_circuit`).
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

_CIRCUITS = "Lan et al. 2024, node circuits of GPT-2 small as the code release ships them (data/*_gpt2small_circuit.json)"
_TASK_WORDS = {"numerals": "numerals", "numwords": "number words"}
NUMBERS = pd.DataFrame(
    [
        (f"circuit score on {_TASK_WORDS[on]} (%)", f"{circuit} circuit", "", "GPT-2 small (paper)", score,
         "Lan et al. 2024, cross-task circuit scores, GPT-2 small (table/figure not checked)")
        for (circuit, on), score in CROSS_TASK.items()
    ] + [
        ("circuit heads", "numerals", "", "GPT-2 small (paper)", 14, _CIRCUITS),
        ("circuit heads", "numwords", "", "GPT-2 small (paper)", 19, _CIRCUITS),
        ("circuit heads", "months", "", "GPT-2 small (paper)", 13, _CIRCUITS),
        ("heads in all three circuits", "all", "", "GPT-2 small (paper)", len(SHARED_HEADS),
         "Lan et al. 2024, shared sub-circuit of GPT-2 small (table/figure not checked): "
         + " ".join(f"{l}.{h}" for l, h in SHARED_HEADS)),
        ("MLPs in all three circuits", "all", "", "GPT-2 small (paper)", len(SHARED_MLPS), "Lan et al. 2024, shared sub-circuit of GPT-2 small (table/figure not checked): MLPs 0-4 and 6-10"),
    ],
    columns=["quantity", "task", "condition", "model", "value", "source"],
)
