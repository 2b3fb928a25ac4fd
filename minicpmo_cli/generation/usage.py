"""Token counts of a generate call, for the callers that report them (the server's OpenAI ``usage``).

No torch here: the server imports it at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass

from minicpmo_cli.generation.settings import cut_at_stop


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
    return sum(len(cut_at_stop(row, stop_ids)) for row in sequences.tolist())
