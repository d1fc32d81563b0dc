"""Which attention-DP group takes a request (rank 0, `DistEngine.add_request`).

Least loaded (fewest unfinished requests; the lowest group on a tie), except that with prefix caching a request
goes to the group that last took a prompt sharing its deepest full cache block, as long as that group is not more
than `slack` requests busier than the least loaded one: that group's prefix cache probably still holds those
blocks (a system prompt shared by many requests then stays in one group's cache instead of being computed once
per group). Rank 0 cannot see the other groups' caches, so this is a guess from the routing history; a wrong
guess costs only a cache miss. The history keeps the chained block hashes the engine's prefix cache uses
(`block_manager.chain_hashes`), at most `capacity` of them, oldest dropped first.
"""

from __future__ import annotations

from collections import OrderedDict

from .block_manager import PrefixCache, chain_hashes


class DPRouter:
    def __init__(self, groups: int, block_size: int, *, prefix_aware: bool, slack: int, capacity: int = 1 << 16):
        self.groups, self.block_size, self.prefix_aware, self.slack = groups, block_size, prefix_aware, slack
        self.capacity = capacity
        self.owner: OrderedDict[bytes, int] = OrderedDict()  # block hash -> group that last took it
        self.prefix_routed = 0  # requests sent to a group for its cache, not its load

    def route(self, prompt_ids: list[int], load: list[int]) -> int:
        """The group for this prompt, given each group's unfinished requests; remembers the choice."""
        least = min(range(self.groups), key=lambda g: (load[g], g))
        if not self.prefix_aware or self.groups == 1:
            return least
        n = PrefixCache.boundary(len(prompt_ids), self.block_size) // self.block_size
        hashes = chain_hashes(prompt_ids, self.block_size, n)
        g = next((self.owner[h] for h in reversed(hashes) if h in self.owner), None)
        pick = g if g is not None and load[g] <= load[least] + self.slack else least
        self.prefix_routed += pick != least
        for h in hashes:
            self.owner[h] = pick
            self.owner.move_to_end(h)
        while len(self.owner) > self.capacity:
            self.owner.popitem(last=False)
        return pick


__all__ = ["DPRouter"]
