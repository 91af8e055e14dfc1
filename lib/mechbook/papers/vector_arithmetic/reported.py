"""The numbers Merullo, Eickhoff & Pavlick (2024) report, in one place (Paper A).

Chapters a1-a6 and the across-models chapter read them from here and always show
them marked as the paper's. Each row's ``source`` names where it comes from: the
section of the paper (NAACL 2024, arXiv 2305.16130; the book's references.bib key
``merullo2024``), or the authors' code release (github.com/jmerullo/lm_vector_arithmetic).
The table or figure of a number is named where it was checked; "table/figure not
checked" marks a number read from the section's text whose table or figure the book's
authors could not verify. Only numbers listed in the book's notes on the papers
(``shared/PAPERS.md``) are kept.
"""

from __future__ import annotations

import pandas as pd

# GPT-2 medium, logit lens on world capitals (§3): the argument is top-1 at layers 14-18, the answer from layer 19.
GPT2_MEDIUM_STAGES = {"n_layers": 24, "argument_formation": 14, "function_application": 19}
# The released o vectors of GPT-2 medium come from layer 19 (capitals, uppercasing) and 18 (past tense) of 24:
# the file names in the code release, ovectors/gpt2-medium/{city_capital_o19,uppercase_o19,regular_past_o18}_gpt2-medium.npy.
GPT2_MEDIUM_O_LAYERS = {"capitals": 19, "uppercase": 19, "past_tense": 18}
# §5, FFN removal: top-down in steps of 1/6 of the layers; BLOOM-176B's reported point is the top 24 of its 70.
FFN_REMOVAL_STEPS = 6
BLOOM_176B_POINT = (24, 70)
# §5 (table/figure not checked): BLOOM-176B on colored objects with its top 24 FFNs removed. Accuracy drops by
# 0.73 on the abstractive version, down to 0.01 (so 0.74 intact), and by 0.17 on the extractive one.
FFN_REMOVAL_BLOOM = pd.DataFrame(
    [("abstractive", 0.74, 0.01, 0.73), ("extractive", None, None, 0.17)],
    columns=["variant", "accuracy_intact", "accuracy_at", "drop_at"],
)

# The book's "capitalize" task (red -> Red) stands in for the paper's uppercasing (colored-objects answers).
BOOK_TASKS = {"uppercase": "capitalize"}

# §4.1 (table/figure not checked): transplanting o ("replace the FFNs with o") into no-context prompts, GPT-2 family. Failure = no effect.
TRANSPLANT = pd.DataFrame(
    [
        ("capitals", "in-domain", 0.37, "~10 -> 4"), ("capitals", "out-of-domain", 0.20, "20 -> 3"),
        ("uppercase", "in-domain", 0.04, "promoted almost always"),
        ("uppercase", "out-of-domain", 0.05, "promoted almost always"),
        ("past_tense", "in-domain", 0.19, "7 -> 3 (regular)"), ("past_tense", "out-of-domain", 0.22, "6 -> 3 (irregular)"),
    ],
    columns=["task", "domain", "failure_rate", "rank_before_after"],
)

NUMBERS = pd.DataFrame(
    [
        ("function layer, fraction of depth", "capitals", "", "GPT-2 medium (paper)", 2 / 3,
         "Merullo et al. 2024, §3, text: 'about 2/3 of the way' through GPT-2 medium (table/figure not checked)"),
    ] + [
        (f"transplant failure, {row.domain}", row.task, "", "GPT-2 (paper)", row.failure_rate,
         "Merullo et al. 2024, §4.1: 'no effect' rate of the o transplant (table/figure not checked)")
        for row in TRANSPLANT.itertuples()
    ] + [
        ("FFN ablation, accuracy drop", "uppercase", row.variant, "BLOOM-176B (paper)", row.drop_at,
         "Merullo et al. 2024, §5: colored objects, top 24 of 70 FFNs removed (table/figure not checked)")
        for row in FFN_REMOVAL_BLOOM.itertuples()
    ],
    columns=["quantity", "task", "condition", "model", "value", "source"],
)
