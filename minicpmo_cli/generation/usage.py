"""Token counts of a generate call, for the callers that report them (the server's OpenAI ``usage``).

No torch here: the server imports it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Usage:
    """Token counts of one generate call, filled in as it runs (what an OpenAI-style ``usage`` reports).

    ``completion_tokens`` counts the generated ids of every row, a stop token included; a streamed answer
    counts what was generated before it ended or was stopped."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


def generated_count(sequences, stop_ids: list[int]) -> int:
    """The ids generated over all rows of ``run_llm_generate``'s padded result: each row up to and including
    its first stop id (what follows is padding), a row without one in full."""
    total = 0
    for row in sequences.tolist():
        ends = [index for index, token in enumerate(row) if token in stop_ids]
        total += ends[0] + 1 if ends else len(row)
    return total
