"""One sequence's position in its grammar."""

from __future__ import annotations

import llguidance


class StructuredOutputRequest:
    """A sequence's matcher (a copy of its spec's compiled one), advanced with each token the
    sequence accepts, on the gateway's event loop only.

    - ``vocab_size``: the bitmask's token count (the model's vocabulary).
    - ``terminated``: the grammar is complete and cannot be extended: the request is done.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar rejects it (the matcher then stays in
        its error state)."""
        return self.matcher.consume_token(token)

    @property
    def terminated(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def error(self) -> str:
        return self.matcher.get_error()
