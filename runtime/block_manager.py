"""Cache-block accounting with reference counts, and the prefix cache.

Every sequence holds ceil(tokens / block_size) blocks of a fixed pool sized from the cache budget and the
model's bytes per token; when a step cannot get its blocks the scheduler preempts. The V4 cache state itself
lives in each sequence's `SeqCache` (window ring, compressed entries, indexer keys, compressor state).

Prefix cache: when a prompt's prefill reaches one of its snapshot points (block_size * 2^k, and its last
block boundary), a copy of the sequence's cache state there is stored under the chained hash of the prompt's
blocks (each block's hash covers all tokens before it). A new request whose prompt starts with the same
blocks restores the deepest stored state and skips those tokens. Any prefix of at least one block hits, short prompts included: the state at a boundary holds
every cache kind (window, CSA, HCA, indexer, compressor state) at once, so no cache kind imposes a larger
alignment. Stored states are reference-counted while being restored and evicted least-recently-used beyond
their memory budget.
"""

from __future__ import annotations

import copy
import hashlib
from collections import OrderedDict

from ascend_v4.model.cache import SeqCache


class NoFreeBlocks(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.ref = [0] * num_blocks

    def blocks_needed(self, held: int, tokens: int) -> int:
        return max(0, -(-tokens // self.block_size) - held)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self.free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise NoFreeBlocks(f"need {n} cache blocks, {len(self.free)} free")
        out = [self.free.pop() for _ in range(n)]
        for b in out:
            self.ref[b] = 1
        return out

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)
        blocks.clear()

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free)


def chain_hashes(ids: list[int], block_size: int, max_blocks: int) -> list[bytes]:
    """h_k = H(h_{k-1} || tokens of block k), for the first max_blocks full blocks."""
    out, h = [], b""
    for k in range(max_blocks):
        blk = ids[k * block_size:(k + 1) * block_size]
        h = hashlib.blake2b(h + b"".join(t.to_bytes(4, "little") for t in blk), digest_size=16).digest()
        out.append(h)
    return out


class PrefixCache:
    """block-chain hash -> SeqCache snapshot at that block boundary (LRU, bounded by bytes)."""

    def __init__(self, block_size: int, max_bytes: int):
        self.block_size, self.max_bytes = block_size, max_bytes
        self.entries: OrderedDict[bytes, tuple[int, SeqCache]] = OrderedDict()  # hash -> (tokens, state)
        self.bytes = 0
        self.queries = self.hit_tokens = self.query_tokens = 0

    @staticmethod
    def boundary(prompt_len: int, block_size: int) -> int:
        """Deepest block boundary that still leaves a prompt token to compute (its logits are needed)."""
        return ((prompt_len - 1) // block_size) * block_size

    @staticmethod
    def snapshot_points(prompt_len: int, block_size: int) -> list[int]:
        """Prompt positions whose state is stored: block_size * 2^k and the deepest boundary. A later prompt
        sharing L tokens with this one restores at least half of them; storage is O(log n) per prompt."""
        last = PrefixCache.boundary(prompt_len, block_size)
        pts, b = set(), block_size
        while b < last:
            pts.add(b)
            b *= 2
        if last:
            pts.add(last)
        return sorted(pts)

    def lookup(self, prompt: list[int]) -> tuple[int, SeqCache | None]:
        """(tokens covered, a private copy of the cache state) for the deepest stored prefix of `prompt`."""
        self.queries += 1
        self.query_tokens += len(prompt)
        nb = self.boundary(len(prompt), self.block_size) // self.block_size
        for k, h in reversed(list(enumerate(chain_hashes(prompt, self.block_size, nb), start=1))):
            hit = self.entries.get(h)
            if hit is not None:
                self.entries.move_to_end(h)
                self.hit_tokens += hit[0]
                return hit[0], copy.deepcopy(hit[1])
        return 0, None

    def store(self, prompt: list[int], tokens: int, cache: SeqCache) -> None:
        if tokens <= 0 or tokens % self.block_size:
            return
        h = chain_hashes(prompt, self.block_size, tokens // self.block_size)[-1]
        if h in self.entries:
            self.entries.move_to_end(h)
            return
        snap = copy.deepcopy(cache)
        size = snap.nbytes()
        if size > self.max_bytes:
            return
        self.entries[h] = (tokens, snap)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, old) = self.entries.popitem(last=False)
            self.bytes -= old.nbytes()

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0
