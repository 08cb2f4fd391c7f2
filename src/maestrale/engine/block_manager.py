"""KV blocks of a paged cache: a free list, reference counts, and prefix caching of full blocks by their tokens."""

from __future__ import annotations

from collections import OrderedDict


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set once the block is full and its keys/values are computed
        self.token_ids: tuple[int, ...] = ()


def block_hash(token_ids: tuple[int, ...], previous: int | None) -> int:
    """A full block's key: its tokens and, through `previous`, every token before them."""
    return hash((previous, token_ids))


class BlockManager:
    """Hands out blocks of `block_size` token slots to sequences (their `block_table`).

    A freed block keeps its hash and contents until it is handed out again, so a later sequence with the same
    prefix (a shared system prompt) finds it and skips computing those tokens. Free blocks are reused oldest
    first. Only full blocks whose keys/values have been computed are ever shared, and shared blocks are never
    written: a sequence writes only beyond the tokens it found cached.
    """

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"the KV cache needs at least one block of one token, got num_blocks={num_blocks}, "
                             f"block_size={block_size}")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[int, int] = {}  # hash -> block id
        self.prefix_hits = 0  # tokens found cached, for /metrics

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_used(self) -> int:
        return len(self.blocks) - len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free(self) -> Block:
        block = self.blocks[self.free.popitem(last=False)[0]]
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash, block.token_ids = None, ()
        block.ref_count = 1
        return block

    def allocate(self, seq) -> bool:
        """Give `seq` blocks for all its tokens, reusing cached prefix blocks; set seq.num_computed to what was
        found. False (and nothing taken) when the free blocks do not suffice."""
        if self.blocks_for(len(seq.token_ids)) > len(self.free):
            return False
        size, tokens = self.block_size, seq.token_ids
        previous = None
        # The last token is always computed, since its logits give the next token.
        for i in range((len(tokens) - 1) // size):
            chunk = tuple(tokens[i * size : (i + 1) * size])
            h = block_hash(chunk, previous)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].token_ids != chunk:
                break
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
            seq.block_table.append(block_id)
            seq.block_hashes.append(h)
            previous = h
        seq.num_computed = len(seq.block_table) * size
        self.prefix_hits += seq.num_computed
        while len(seq.block_table) < self.blocks_for(len(tokens)):
            seq.block_table.append(self._take_free().block_id)
        return True

    def grow(self, seq, num_tokens: int) -> bool:
        """Make room in seq's blocks for `num_tokens` tokens; False when no free block is left."""
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        if needed > len(self.free):
            return False
        for _ in range(needed):
            seq.block_table.append(self._take_free().block_id)
        return True

    def register(self, seq) -> None:
        """Make seq's newly computed full blocks findable by later sequences."""
        size = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // size):
            chunk = tuple(seq.token_ids[i * size : (i + 1) * size])
            h = block_hash(chunk, seq.block_hashes[-1] if seq.block_hashes else None)
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = h, chunk
            self.cached[h] = block.block_id
            seq.block_hashes.append(h)

    def free_blocks(self, seq) -> None:
        """Release seq's blocks, its last ones first: its first blocks (prefixes others are likelier to share)
        are then reused last."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed = 0
