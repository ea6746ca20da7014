"""The engine core's outgoing rows, gathered over one iteration and sent as one message."""

from __future__ import annotations

import numpy as np

from neo_common.engine_core_protocol import NO_TOKEN, EngineCoreOutputs, IterationStats, finish_code
from neo_common.enums import FinishReason


class OutputBatch:
    """Rows for the API server since the last ``take``: per row a request, its token (or
    ``NO_TOKEN``), its finish, whether the token is a stop token, and any details (see
    ``EngineCoreOutputs``)."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self.seq_ids: list[int] = []
        self.tokens: list[int] = []
        self.finish: list[int] = []
        self.stop_token: list[bool] = []
        self.details: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.seq_ids)

    def add(self, seq_id: int, token: int = NO_TOKEN, reason: FinishReason | None = None,
            stop_token: bool = False, **details) -> None:
        if details:
            self.details[len(self.seq_ids)] = details
        self.seq_ids.append(seq_id)
        self.tokens.append(token)
        self.finish.append(finish_code(reason))
        self.stop_token.append(stop_token)

    def fail(self, seq_id: int, message: str) -> None:
        self.add(seq_id, reason=FinishReason.ERROR, error=message)

    def take(self, iteration: IterationStats | None = None) -> EngineCoreOutputs:
        msg = EngineCoreOutputs(seq_ids=np.array(self.seq_ids, np.int64), token_ids=np.array(self.tokens, np.int32),
                                finish=np.array(self.finish, np.int8), stop_token=np.array(self.stop_token, np.bool_),
                                details=self.details,
                                iteration=iteration.to_dict() if iteration is not None else {})
        self._clear()
        return msg
