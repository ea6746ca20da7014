"""The error every request-parameter check raises (a 400 naming the field)."""

from __future__ import annotations


class ParamError(ValueError):
    """A request parameter is out of range; ``param`` names the field for the error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
