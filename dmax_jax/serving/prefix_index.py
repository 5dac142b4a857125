"""The prefix cache's index: which committed blocks' K/V the engine keeps, keyed by their tokens.

Why reuse is exact here: in the block-causal layout (algorithm §5.1) the K/V of a committed block
are a function of its tokens and of every token before it (positions included: the index is rooted
at position 0), never of later tokens or of the batch. So a request whose first ``j`` blocks equal
a cached chain of ``j`` blocks may copy their K/V instead of prefilling them, and decodes the same
tokens. What enters: whole blocks below a slot's committed length — prompt blocks before ``s0`` once
prefilled, and the generated blocks committed by a cross-block forward (multi-turn chat resends
them). What never enters: the prompt tail inside the first decoded block and the still-revisable
block (its K/V are not committed).

The index is a trie over blocks (a node's key is its ``B`` token ids; its path from the root is the
whole prefix, so a hit can never be a foreign prefix with an equal hash). Each node owns one entry
of the device pool (:mod:`dmax_jax.serving.prefix_pool`). Eviction is least-recently-used among
leaves (a node's children need it), never a node of the chain being matched or inserted.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np


@dataclasses.dataclass(eq=False)
class _Node:
    entry: int                       # pool entry holding this block's K/V (-1: the root)
    parent: _Node | None
    key: bytes                       # the block's token ids
    children: dict = dataclasses.field(default_factory=dict)


class PrefixIndex:
    """Host-side trie of cached blocks over ``entries`` pool entries of ``block_length`` tokens.

    Args:
        entries: pool entries (blocks) the budget holds; 0 turns the cache off.
        block_length: tokens per block (the engine's ``B``).
    """

    def __init__(self, entries: int, block_length: int) -> None:
        if isinstance(entries, bool) or not isinstance(entries, int) or entries < 0:
            raise ValueError(f"prefix cache entries must be an integer >= 0, got {entries!r}")
        self.entries, self.block_length = entries, block_length
        self._root = _Node(-1, None, b"")
        self._free = list(range(entries - 1, -1, -1))
        self._lru: collections.OrderedDict[_Node, None] = collections.OrderedDict()  # oldest first
        self.counters = collections.Counter(hits=0, misses=0, hit_blocks=0, inserted_blocks=0,
                                            evictions=0)

    @property
    def enabled(self) -> bool:
        return self.entries > 0

    @property
    def cached_blocks(self) -> int:
        return len(self._lru)

    def _blocks(self, ids: np.ndarray, n: int) -> list[bytes]:
        B = self.block_length
        a = np.ascontiguousarray(ids[:n * B], np.int32)
        return [a[j * B:(j + 1) * B].tobytes() for j in range(n)]

    def _walk(self, keys: list[bytes]) -> list[_Node]:
        """The cached nodes of the longest chain matching ``keys`` (each touched: most recent)."""
        chain, node = [], self._root
        for k in keys:
            node = node.children.get(k)
            if node is None:
                break
            chain.append(node)
            self._lru.move_to_end(node)
        return chain

    def match(self, ids: np.ndarray, n_blocks: int, multiple: int = 1) -> list[int]:
        """Pool entries of the longest cached chain of ``ids``' first ``n_blocks`` blocks, cut to a
        multiple of ``multiple`` blocks (a hit counts when it is non-empty). The caller copies them
        before any later :meth:`insert`."""
        if not self.enabled or n_blocks <= 0:
            return []
        chain = self._walk(self._blocks(ids, n_blocks))
        chain = chain[:len(chain) // multiple * multiple]
        self.counters["hits" if chain else "misses"] += 1
        self.counters["hit_blocks"] += len(chain)
        return [n.entry for n in chain]

    def insert(self, ids: np.ndarray, n_blocks: int) -> list[tuple[int, int]]:
        """Add ``ids``' first ``n_blocks`` blocks; ``[(block index, pool entry)]`` of those the caller
        must copy into the pool now. Stops early when the budget cannot hold more (a shorter
        chain is still a valid prefix)."""
        if not self.enabled or n_blocks <= 0:
            return []
        keys = self._blocks(ids, n_blocks)
        chain = self._walk(keys)
        node = chain[-1] if chain else self._root
        protected = set(chain)
        out = []
        for j in range(len(chain), n_blocks):
            entry = self._take(protected)
            if entry is None:
                break
            child = _Node(entry, node, keys[j])
            node.children[keys[j]] = child
            node = child
            protected.add(node)
            self._lru[node] = None
            out.append((j, entry))
        self.counters["inserted_blocks"] += len(out)
        return out

    def _take(self, protected: set) -> int | None:
        """A free pool entry, evicting the least recently used unprotected leaf if none is free."""
        if self._free:
            return self._free.pop()
        victim = next((n for n in self._lru if not n.children and n not in protected), None)
        if victim is None:
            return None
        del self._lru[victim]
        del victim.parent.children[victim.key]
        self.counters["evictions"] += 1
        return victim.entry

    def clear(self) -> None:
        """Forget every entry (the pool's contents become garbage nobody reads)."""
        self._root.children.clear()
        self._lru.clear()
        self._free = list(range(self.entries - 1, -1, -1))

    def stats(self) -> dict:
        return {f"prefix_cache_{k}": v for k, v in self.counters.items()} | {
            "prefix_cache_blocks": self.cached_blocks, "prefix_cache_capacity_blocks": self.entries}
