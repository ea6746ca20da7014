"""Structured outputs (vLLM's design, llguidance as the grammar library): a request's constraint
(:mod:`spec`) is compiled once per distinct spec, off the event loop and cached (:mod:`manager`);
each sequence advances its own matcher with every accepted token (:mod:`request`), and the
gateway packs the next step's allowed tokens into an int32 bitmask per constrained row
(:mod:`bitmask`) that the worker applies on the device before sampling."""

from neo_gateway.structured_output.bitmask import bitmask_width, distinct_rows, fill_bitmasks, unpack_bitmask
from neo_gateway.structured_output.manager import StructuredOutputManager
from neo_gateway.structured_output.request import StructuredOutputRequest
from neo_gateway.structured_output.spec import StructuredOutputKind, StructuredOutputSpec, spec_from_fields

__all__ = ["StructuredOutputKind", "StructuredOutputManager", "StructuredOutputRequest", "StructuredOutputSpec",
           "bitmask_width", "fill_bitmasks", "spec_from_fields", "unpack_bitmask"]
