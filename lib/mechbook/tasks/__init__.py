"""Data sets and tokenizer-aware prompt builders, one module per paper."""

from mechbook.tasks import vector_arithmetic
from mechbook.tasks.vector_arithmetic import (
    Pair,
    PromptSet,
    build_prompts,
    capital_pairs,
    known_tasks,
    past_tense_pairs,
    uppercase_pairs,
    us_state_capital_pairs,
)

__all__ = [
    "Pair",
    "PromptSet",
    "build_prompts",
    "capital_pairs",
    "known_tasks",
    "past_tense_pairs",
    "uppercase_pairs",
    "us_state_capital_pairs",
    "vector_arithmetic",
]
