"""Preallocated key/value cache with per-sequence slots, for decoding without a per-token ``torch.cat``.

``KVCache`` holds keys and values (layers, slots, kv_heads, max_len, head_dim), an additive bias per stored position
(slots, max_len): 0 for real tokens, -inf for left padding (stored but never attended to), each slot's next position
id, and each slot's length on the host. A sequence owns a slot from ``allocate`` to ``release``, so a server can add
and remove sequences of a running batch between decode steps; ``view(slots)`` names the rows of one forward pass.

Each forward pass opens one ``CacheStep`` for all layers: it writes the new tokens' mask, decides the attention mask
once (none at all while no slot holds padding and a single token is decoded), and gives every layer a write-then-read
of its keys and values. Lengths live on the host, so no step waits for the device to learn them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        # Additive attention bias per stored position: 0 for a real token, -inf for padding (and never-written room).
        self.key_bias = torch.full((num_slots, max_len), float("-inf"), dtype=dtype, device=device)
        self.next_position = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.lengths = [0] * num_slots
        self.padded = [False] * num_slots  # whether the slot stores any position that is not attended to
        self._free = list(range(num_slots))

    @property
    def num_slots(self) -> int:
        return len(self.lengths)

    @property
    def max_len(self) -> int:
        return self.keys.shape[3]

    def allocate(self, count: int) -> list[int]:
        """Reserve ``count`` empty slots (lowest ids first, so a fresh batch gets one contiguous range)."""
        if count > len(self._free):
            raise RuntimeError(f"KV cache has {len(self._free)} free slots of {self.num_slots}; {count} requested")
        self._free.sort()
        slots, self._free = self._free[:count], self._free[count:]
        for slot in slots:
            self.lengths[slot] = 0
            self.padded[slot] = False
        self.next_position[slots] = 0
        return slots

    def release(self, slots: Sequence[int]) -> None:
        """Return slots to the free list; their contents are forgotten (no tensor is cleared). All or nothing: a slot
        that is not allocated (or named twice) raises before any is freed."""
        seen: set[int] = set()
        for slot in slots:
            if slot in self._free or slot in seen or not 0 <= slot < self.num_slots:
                raise ValueError(f"slot {slot} is not allocated")
            seen.add(slot)
        self._free.extend(slots)

    def view(self, slots: Sequence[int]) -> CacheView:
        return CacheView(self, slots)


class CacheView:
    """The cache rows of one batch: row b of the model's input is slot ``slots[b]``."""

    def __init__(self, cache: KVCache, slots: Sequence[int]) -> None:
        self.cache = cache
        self.slots = [int(s) for s in slots]
        if len(set(self.slots)) != len(self.slots):
            raise ValueError(f"repeated slots {self.slots}")
        first = self.slots[0] if self.slots else 0
        # Consecutive slots are read and written through slices (views); any other set through index tensors.
        self.range = (
            (first, first + len(self.slots)) if self.slots == list(range(first, first + len(self.slots))) else None
        )
        self.index = torch.tensor(self.slots, dtype=torch.long, device=cache.keys.device)

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def lengths(self) -> list[int]:
        return [self.cache.lengths[s] for s in self.slots]

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor[slots]`` for a per-slot tensor (a view when the slots are consecutive)."""
        return tensor[self.range[0] : self.range[1]] if self.range is not None else tensor[self.index]

    def begin(self, length: int, attention_mask: torch.Tensor | None, blocks: torch.Tensor | None = None) -> CacheStep:
        return CacheStep(self, length, attention_mask, blocks)


class CacheStep:
    """One forward pass of ``length`` new tokens per row; ``attention_mask`` (B, length) marks real tokens;
    ``blocks`` (B, length): new tokens sharing an id >= 0 see each other in both directions."""

    def __init__(
        self, view: CacheView, length: int, attention_mask: torch.Tensor | None, blocks: torch.Tensor | None = None
    ) -> None:
        cache = view.cache
        self.view = view
        self.length = length
        self.blocks = blocks
        self.starts = view.lengths
        self.end = max(self.starts) + length
        if self.end > cache.max_len:
            raise RuntimeError(f"KV cache overflow: {self.end} positions needed, max_len is {cache.max_len}")
        # The common case (a batch decoding in lockstep from consecutive slots) reads and writes through slices.
        self.sliced = len(set(self.starts)) == 1 and view.range is not None
        has_padding = attention_mask is not None and not bool(attention_mask.all())
        new_bias = (
            0.0
            if attention_mask is None
            else torch.zeros(attention_mask.shape, dtype=cache.key_bias.dtype, device=cache.keys.device).masked_fill(
                attention_mask.to(cache.keys.device) == 0, float("-inf")
            )
        )
        if self.sliced:
            first, last = view.range  # type: ignore[misc]
            start = self.starts[0]
            cache.key_bias[first:last, start : self.end] = new_bias
            # (layers, B, kv_heads, ., head_dim) views made once here, so a layer only selects its own.
            self.write = (
                cache.keys[:, first:last, :, start : self.end],
                cache.values[:, first:last, :, start : self.end],
            )
            self.read = (cache.keys[:, first:last, :, : self.end], cache.values[:, first:last, :, : self.end])
        else:
            rows, columns = self._positions()
            cache.key_bias[rows, columns] = new_bias
        for slot in view.slots:
            cache.padded[slot] = cache.padded[slot] or has_padding
        self.attention_mask = self._attention_mask()

    def _positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, length) slot and position indices of the new tokens."""
        device = self.view.index.device
        starts = torch.tensor(self.starts, dtype=torch.long, device=device)
        columns = starts[:, None] + torch.arange(self.length, device=device)  # (B, length)
        return self.view.index[:, None].expand_as(columns), columns

    def _attention_mask(self) -> torch.Tensor | None:
        """(B, 1, length, end) for SDPA: None when every query may see every stored key; for one token per row in
        lockstep, the slots' additive key bias itself (0 / -inf, nothing computed); else a bool mask, True = attend."""
        cache, view = self.view.cache, self.view
        lockstep = self.length == 1 and len(set(self.starts)) == 1 and self.blocks is None
        if lockstep and not any(cache.padded[s] for s in view.slots):
            return None
        key_bias = view.rows(cache.key_bias)[:, : self.end]  # (B, end)
        if lockstep:
            return key_bias[:, None, None, :]
        device = key_bias.device
        starts = torch.tensor(self.starts, device=device)
        query_at = starts[:, None] + torch.arange(self.length, device=device)  # (B, length) absolute positions
        key_at = torch.arange(self.end, device=device)
        causal = key_at[None, None, :] <= query_at[:, :, None]  # (B, length, end)
        # Each query also sees itself: a padded query would otherwise have no key at all, and SDPA's NaN for that row
        # would reach the real tokens through the cached values of later layers.
        mask = (causal & (key_bias == 0)[:, None, :]) | (key_at[None, None, :] == query_at[:, :, None])
        if self.blocks is not None:  # blocks are made of this pass's tokens: scatter their ids to their key columns
            blocks = self.blocks.to(device)
            key_blocks = torch.full((len(view), self.end), -1, dtype=torch.long, device=device)
            key_blocks.scatter_(1, query_at, blocks)
            mask = mask | same_block(blocks, key_blocks)
        return mask[:, None]  # (B, 1, length, end)

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values (B, kv_heads, length, head_dim) of ``layer``; return all stored ones
        (B, kv_heads, end, head_dim)."""
        if self.sliced:
            self.write[0][layer].copy_(keys)
            self.write[1][layer].copy_(values)
            return self.read[0][layer], self.read[1][layer]
        cache, view = self.view.cache, self.view
        rows, columns = self._positions()
        # Advanced indices on dims 0 and 2 of (slots, heads, len, dim) put the indexed dims first: (B, length, ...).
        cache.keys[layer][rows, :, columns] = keys.transpose(1, 2)
        cache.values[layer][rows, :, columns] = values.transpose(1, 2)
        return cache.keys[layer][view.index, :, : self.end], cache.values[layer][view.index, :, : self.end]

    def store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store this step's keys/values of every layer at once (layers, B, kv_heads, length, head_dim): what a
        compiled decoding step returns instead of writing them layer by layer (``update``)."""
        if self.sliced:
            self.write[0].copy_(keys)
            self.write[1].copy_(values)
            return
        cache = self.view.cache
        rows, columns = self._positions()
        cache.keys[:, rows, :, columns] = keys.permute(1, 3, 0, 2, 4)  # (B, length, layers, kv_heads, hd)
        cache.values[:, rows, :, columns] = values.permute(1, 3, 0, 2, 4)

    def finish(self, next_positions: torch.Tensor) -> None:
        """After the forward pass: advance host lengths and store each row's next position id (B,)."""
        cache = self.view.cache
        for slot in self.view.slots:
            cache.lengths[slot] += self.length
        if self.view.range is not None:
            cache.next_position[self.view.range[0] : self.view.range[1]] = next_positions
        else:
            cache.next_position[self.view.index] = next_positions


def same_block(query_blocks: torch.Tensor, key_blocks: torch.Tensor) -> torch.Tensor:
    """(B, Tq, Tk) bool: query and key share a bidirectional block (an id >= 0)."""
    return (query_blocks[:, :, None] == key_blocks[:, None, :]) & (query_blocks[:, :, None] >= 0)
