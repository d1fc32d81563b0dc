"""Cache blocks with reference counts, and the prefix cache over them.

The engine's `CachePool` (model/cache.py) has *window* blocks of B/4 tokens (raw KV rows of every layer, only
the last few per sequence are live), *comp* blocks of B tokens (compressed KV entries and
indexer keys, kept for the whole sequence), plus *state* slots (the compressor state at a prompt block's end,
only while it is a prefix-cache entry). `BlockManager` hands out all three, one `BlockPool` per kind, and is the
allocator every engine `SeqCache` uses.

Prefix cache (vLLM-style, content-addressed): when a prompt's prefill completes block j, its comp block, its
four window blocks (keys h_j + index) and its state slot are registered under h_j, the chained hash of the prompt's blocks 0..j. A released registered block
(reference count 0) is not freed but parked in an LRU list; allocation takes truly free blocks first, then
evicts the least recently parked. A new request walks its prompt's hashes: it can resume at boundary kB when
comp blocks 0..k-1, the state slot of block k-1 and the window blocks that hold the W-1 positions before kB are
all cached; it then shares those blocks (reference counts, no copies) and copies the compressor state out of
the slot. A sequence gives a state slot back as soon as it is registered, so slots are only ever cache entries.
Any prefix of one whole block hits (B = the largest compression ratio, 128 for V4, is the minimum that holds a
whole block of every cache kind), short prompts included.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from ascend_v4.model.cache import (COMP_KIND, KINDS, RUN_KIND, STATE_KIND, WINDOW_KIND, CachePool, NoFreeBlocks,
                                   SeqCache, check_block_size)

def make_cache_pool(model, cfg, device) -> CachePool:
    """Size and allocate the paged cache. Comp blocks (the part that grows with context) get cache_gib;
    window blocks are sized so running sequences can never run short (each keeps only the blocks its
    window overlaps, plus one step's new tokens), plus prefix_cache_gib to keep prompts' window blocks
    for prefix hits."""
    args, B = model.args, cfg.block_size
    try:
        check_block_size(args, B)
    except ValueError as e:
        raise ValueError(f"EngineConfig.block_size: {e}") from None
    pool = CachePool(args, B, 0, 0, model.opts.dtype, device, cfg.kv_cache_dtype)
    comp = cfg.num_blocks or max(cfg.max_num_seqs, int(cfg.cache_gib * (1 << 30) / pool.block_bytes(COMP_KIND)))
    bw = pool.window_block
    per_seq = -(-(args.window_size + 2) // bw) + 2  # live window blocks per sequence after a trim, + 1 spare
    window = cfg.max_num_seqs * per_seq + -(-cfg.max_num_batched_tokens // bw)
    state = 0
    if cfg.enable_prefix_caching:
        # One resume point of a cached prefix = the window blocks before it + one state slot.
        per_point = -(-(args.window_size - 1) // bw) + 1
        kept = int(cfg.prefix_cache_gib * (1 << 30) / (per_point * pool.block_bytes(WINDOW_KIND)
                                                       + pool.block_bytes(STATE_KIND)))
        window += kept * per_point
        # slots are held from reservation until the block completes (then they are cache entries)
        state = (-(-cfg.max_num_batched_tokens // B) + cfg.max_num_seqs + kept) if pool.has_state else 0
    # One run slot (running compressor state) per running sequence, + 1 for a sequence being admitted.
    pool.resize(window, comp, state, cfg.max_num_seqs + 1 if pool.has_compressor else 0)
    return pool


__all__ = ["make_cache_pool", "BlockManager", "BlockPool", "NoFreeBlocks", "PrefixCache", "chain_hashes"]


class BlockPool:
    """Free list, reference counts and content hashes of one kind of block."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.ref = [0] * num_blocks
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.parked: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, LRU first

    def available(self) -> int:
        return len(self.free) + len(self.parked)

    def allocate(self, n: int) -> list[int]:
        if n > self.available():
            raise NoFreeBlocks(f"need {n} cache blocks, {self.available()} free")
        out = []
        for _ in range(n):
            if self.free:
                b = self.free.pop()
            else:  # evict the least recently parked cached block
                b, _ = self.parked.popitem(last=False)
                del self.by_hash[self.hash_of.pop(b)]
            self.ref[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if b in self.hash_of:
                    self.parked[b] = None
                else:
                    self.free.append(b)

    def register(self, block: int, h: bytes) -> None:
        """Make a full, final block findable by its content hash (first writer wins)."""
        if h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h], self.hash_of[block] = block, h

    def acquire(self, block: int) -> None:
        """Take a reference on a cached block (a prefix hit)."""
        if self.ref[block] == 0:
            self.parked.pop(block, None)
        self.ref[block] += 1

    @property
    def used(self) -> int:
        return self.num_blocks - len(self.free) - len(self.parked)


class BlockManager:
    """One manager for every cache kind: the allocator (`allocate`/`release`/`can_allocate` by kind) of the
    engine's SeqCaches. `num_blocks` / `used` refer to comp blocks, the part that grows with context."""

    def __init__(self, num_comp_blocks: int, num_window_blocks: int, block_size: int, num_state_slots: int = 0,
                 num_run_slots: int = 0):
        self.block_size = block_size
        self.pools = {COMP_KIND: BlockPool(num_comp_blocks), WINDOW_KIND: BlockPool(num_window_blocks),
                      STATE_KIND: BlockPool(num_state_slots), RUN_KIND: BlockPool(num_run_slots)}

    @classmethod
    def for_pool(cls, pool: CachePool) -> "BlockManager":
        """The allocator of every block and slot `pool` has."""
        n = pool.num
        return cls(n[COMP_KIND], n[WINDOW_KIND], pool.block_size, n[STATE_KIND], n[RUN_KIND])

    def can_allocate(self, kind: str, n: int) -> bool:
        return n <= self.pools[kind].available()

    def allocate(self, kind: str, n: int) -> list[int]:
        return self.pools[kind].allocate(n)

    def release(self, kind: str, blocks: list[int]) -> None:
        self.pools[kind].release(blocks)

    @property
    def num_blocks(self) -> int:
        return self.pools[COMP_KIND].num_blocks

    @property
    def used(self) -> int:
        return self.pools[COMP_KIND].used

    def usage(self) -> dict[str, int]:
        return {f"{k}_blocks_{what}": getattr(self.pools[k], attr) if attr != "parked" else len(self.pools[k].parked)
                for k in (*KINDS, STATE_KIND)
                for what, attr in (("total", "num_blocks"), ("used", "used"), ("cached", "parked"))}


def chain_hashes(ids: list[int], block_size: int, max_blocks: int) -> list[bytes]:
    """h_k = H(h_{k-1} || tokens of block k), for the first max_blocks full blocks."""
    out, h = [], b""
    for k in range(max_blocks):
        blk = ids[k * block_size:(k + 1) * block_size]
        h = hashlib.blake2b(h + b"".join(t.to_bytes(4, "little") for t in blk), digest_size=16).digest()
        out.append(h)
    return out


class PrefixCache:
    """Registration and lookup of prompt blocks in the BlockManager's pools, and hit statistics."""

    def __init__(self, blocks: BlockManager, window_size: int):
        self.blocks, self.block_size, self.window = blocks, blocks.block_size, window_size
        self.queries = self.hit_tokens = self.query_tokens = 0

    @staticmethod
    def boundary(prompt_len: int, block_size: int) -> int:
        """Deepest block boundary that still leaves a prompt token to compute (its logits are needed)."""
        return ((prompt_len - 1) // block_size) * block_size

    def _window_blocks(self, k: int, bw: int) -> range:
        """Window blocks (of bw tokens) a sequence resuming at boundary kB needs: positions >= kB - W + 1."""
        return range(max(0, k * self.block_size - self.window + 1) // bw, k * self.block_size // bw)

    def _window_key(self, hashes: list[bytes], jw: int, bw: int) -> bytes:
        per = self.block_size // bw
        return hashes[jw // per] + bytes([jw % per])

    def register(self, prompt: list[int], hashes: list[bytes], cache: SeqCache, done: int) -> int:
        """Register the prompt blocks [done, upto) the cache has completed, upto = blocks fully computed and
        below the prompt's boundary. Returns the new count of registered blocks."""
        upto = min(cache.length, self.boundary(len(prompt), self.block_size)) // self.block_size
        comp, win, state = (self.blocks.pools[k] for k in (COMP_KIND, WINDOW_KIND, STATE_KIND))
        bw = cache.pool.window_block
        per = self.block_size // bw
        for j in range(done, upto):
            comp.register(cache.comp_blocks[j], hashes[j])
            for jw in range(j * per, (j + 1) * per):
                if cache.win_blocks[jw] >= 0:
                    win.register(cache.win_blocks[jw], self._window_key(hashes, jw, bw))
            slot = cache.state_slots[j]  # reserve keeps one entry per comp block
            if slot >= 0:  # the sequence never reads it again: hand it to the cache right away
                state.register(slot, hashes[j])
                state.release([slot])
                cache.state_slots[j] = -1
        return max(done, upto)

    def lookup(self, prompt: list[int], hashes: list[bytes], pool) -> tuple[int, SeqCache | None]:
        """(tokens covered, a SeqCache sharing the cached blocks) for the deepest usable prefix of `prompt`,
        or (0, None). Takes references on the blocks it shares."""
        if pool.has_compressor and not self.blocks.can_allocate(RUN_KIND, 1):
            return 0, None  # no run slot for the hit's compressor state (the scheduler admits it later)
        self.queries += 1
        self.query_tokens += len(prompt)
        comp, win, state = (self.blocks.pools[k] for k in (COMP_KIND, WINDOW_KIND, STATE_KIND))
        nb = self.boundary(len(prompt), self.block_size) // self.block_size
        chain = []
        for h in hashes[:nb]:
            b = comp.by_hash.get(h)
            if b is None:
                break
            chain.append(b)
        bw = pool.window_block
        for k in range(len(chain), 0, -1):
            need = self._window_blocks(k, bw)
            wins = [win.by_hash.get(self._window_key(hashes, jw, bw)) for jw in need]
            slot = state.by_hash.get(hashes[k - 1]) if pool.has_state else -1
            if all(w is not None for w in wins) and slot is not None:
                break
        else:
            return 0, None
        for b in chain[:k]:
            comp.acquire(b)
        for w in wins:
            win.acquire(w)
        tokens = k * self.block_size
        if slot in state.parked:
            state.parked.move_to_end(slot)  # recently used: evicted last
        run = self.blocks.allocate(RUN_KIND, 1)[0] if pool.has_compressor else -1
        if run >= 0 and pool.has_state:  # the running compressor state starts from the boundary's
            pool.seed_run(run, slot)
        cache = SeqCache(pool, self.blocks, run, comp_blocks=list(chain[:k]), win_blocks=[-1] * need.start + wins,
                         state_slots=[-1] * k, length=tokens, auto_trim=False)
        self.hit_tokens += tokens
        return tokens, cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0

