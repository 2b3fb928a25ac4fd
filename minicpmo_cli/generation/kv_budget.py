"""How much memory the LLM engine's KV slots may take, and what that allows (vLLM's --gpu-memory-utilization
and --max-num-seqs, for fixed slots).

A slot holds every layer's keys and values for ``capacity`` positions, so a pool of ``slots`` x ``capacity``
takes ``slots * capacity * position_bytes(config, dtype)``. Given a budget (the user's, or on CUDA a share of
the memory free after the model is loaded), :func:`plan` says how many requests can decode together at a
default slot capacity; the engine (generation/engine.py) keeps every pool it makes within the budget and
refuses, before taking any memory, a request whose positions alone do not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from minicpmo_cli.generation.requests import ContextTooLong
from minicpmo_cli.generation.static_cache import bucket_length

GIB = 1 << 30
FREE_SHARE = 0.8  # of the GPU memory free after loading: the rest is for activations, graphs, speech, vision
SLOT_CAPACITY = 8192  # positions per slot the default batch is sized for (prompt + answer)
MOST_SLOTS = 256  # vLLM's default --max-num-seqs


@dataclass(frozen=True)
class KVPlan:
    budget_bytes: int  # what the KV slots may take at most
    max_batch: int  # requests decoded together: slots of SLOT_CAPACITY positions in the budget (a power of 2)
    capacity: int  # positions per slot the batch was sized for
    position_bytes: int  # one position of one slot, every layer, keys and values


def position_bytes(config, dtype_bytes: int) -> int:
    """Bytes of one position of one slot: keys and values of every layer."""
    heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * int(dtype_bytes)


def power_of_two_at_most(count: int) -> int:
    return 1 << (max(int(count), 1).bit_length() - 1)


def plan(config, dtype_bytes: int, budget_bytes: int, context: int | None = None,
         capacity: int = SLOT_CAPACITY, most: int = MOST_SLOTS) -> KVPlan:
    """The batch a KV budget allows: slots of ``capacity`` positions (at most the model's ``context``), a power
    of two between 1 and ``most``."""
    per_position = position_bytes(config, dtype_bytes)
    capacity = min(int(capacity), int(context)) if context else int(capacity)
    fitting = int(budget_bytes) // max(per_position * capacity, 1)
    return KVPlan(int(budget_bytes), power_of_two_at_most(min(max(fitting, 1), most)), capacity, per_position)


def budget_from_free(free_bytes: int, share: float = FREE_SHARE) -> int:
    """The default budget on a GPU: a share of the memory free once the model is loaded."""
    return int(int(free_bytes) * float(share))


def describe(budget_bytes: int | None) -> str:
    return "unbounded" if budget_bytes is None else f"{budget_bytes / GIB:.2f} GiB"


def check_fits(budget_bytes: int | None, per_position: int, length: int, max_new_tokens: int) -> None:
    """A request whose positions alone, in one slot, are over the budget is refused before any memory is
    taken (it could never be admitted)."""
    if budget_bytes is None:
        return
    needed = per_position * bucket_length(length + max_new_tokens)
    if needed > budget_bytes:
        raise ContextTooLong(f"the prompt ({length} tokens) plus max_new_tokens ({max_new_tokens}) needs "
                             f"{needed / GIB:.2f} GiB of KV cache, more than its budget of "
                             f"{budget_bytes / GIB:.2f} GiB", parameters=("max_new_tokens",))


def slots_within(budget_bytes: int | None, per_position: int, slots: int, capacity: int, reserve: int = 0) -> int:
    """At most ``slots`` slots of ``capacity`` positions that fit the budget besides ``reserve`` bytes (a power
    of two; 0 when not even one fits)."""
    if budget_bytes is None:
        return slots
    fitting = (budget_bytes - reserve) // (per_position * capacity)
    return min(slots, power_of_two_at_most(fitting)) if fitting >= 1 else 0
