"""Block hashes for automatic prefix caching: a SHA-256 chain over token ids.

Block i of a request is identified by ``H(hash of block i-1, its block_size token ids)``, the chain's
root by ``H(salt)`` where the salt holds everything else that decides the KV (the model, the KV
dtype, the block size). Two requests whose first k blocks hold the same tokens therefore share
those k hashes and can share those k blocks of KV. A cryptographic hash, because the tokens come
from clients: with a weak one, a client could craft a prompt whose block collides with another
user's and be served that user's KV (docs/design.md, "Prefix caching").
"""

from __future__ import annotations

import hashlib

import numpy as np

from neo_gateway.sequence import Sequence


class PrefixHasher:
    """Extends each request's ``block_hashes`` (the chain of its full blocks) as its tokens become
    known; ``root`` is the chain's start for this replica's model and KV layout."""

    def __init__(self, block_size: int, salt: str) -> None:
        self.block_size = block_size
        self.root = hashlib.sha256(salt.encode()).digest()

    def hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The hashes of ``seq``'s first ``num_blocks`` full blocks (computed once, then kept on it)."""
        chain = seq.block_hashes
        bs = self.block_size
        while len(chain) < num_blocks:
            i = len(chain)
            tokens = np.asarray(seq.token_slice(i * bs, (i + 1) * bs), dtype=np.int64)
            chain.append(hashlib.sha256((chain[-1] if chain else self.root) + tokens.tobytes()).digest())
        return chain[:num_blocks]

    def cacheable_prefix_blocks(self, seq: Sequence) -> int:
        """Full prompt blocks a new request may take from the cache: never the block of its last
        token, which is always computed (its logits sample the first output token)."""
        return (seq.num_tokens - 1) // self.block_size
