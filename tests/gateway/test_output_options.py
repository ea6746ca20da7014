"""vLLM's output options on the gateway side: min_tokens (Sequence and stop strings),
include_stop_str_in_output, skip_special_tokens, spaces_between_special_tokens."""

from __future__ import annotations

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from neo_common.model_source import embedded_gguf_path
from neo_gateway.detokenizer import IncrementalDetokenizer
from neo_gateway.param_error import ParamError
from neo_gateway.sampling_params import SamplingParams
from neo_gateway.sequence import FinishReason, Sequence
from neo_gateway.tokenizer import TextTokenizer


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.from_gguf(embedded_gguf_path())


def _text(tok: TextTokenizer, text: str, params: SamplingParams, stop_last: bool = False) -> tuple[str, bool]:
    """Feed ``text``'s tokens one by one (the last as a stop token if ``stop_last``)."""
    detok = IncrementalDetokenizer.for_params(tok, params)
    ids = tok.encode(text, add_special_tokens=False)
    out = "".join(detok.add(t, stop_token=stop_last and i == len(ids) - 1) for i, t in enumerate(ids))
    return out + detok.flush(), detok.stopped


def test_a_stop_string_is_cut_or_kept_with_include_stop_str_in_output(tok):
    text = "Hello world. Goodbye world."
    assert _text(tok, text, SamplingParams(stop=["world"])) == ("Hello ", True)
    assert _text(tok, text, SamplingParams(stop=["world"], include_stop_str_in_output=True)) == ("Hello world", True)


def test_a_stop_tokens_text_is_left_out_unless_included(tok):
    assert _text(tok, "one two three", SamplingParams(), stop_last=True)[0] == "one two"
    assert _text(tok, "one two three", SamplingParams(include_stop_str_in_output=True), stop_last=True)[0] == \
        "one two three"


def test_stop_strings_are_not_looked_for_within_min_tokens(tok):
    ids = tok.encode("Hello world. Goodbye world.", add_special_tokens=False)
    first = len(tok.encode("Hello world", add_special_tokens=False))
    out, stopped = _text(tok, "Hello world. Goodbye world.", SamplingParams(stop=["world"], min_tokens=first,
                                                                            max_tokens=len(ids)))
    assert stopped and out == "Hello world. Goodbye "


def test_min_tokens_keeps_stop_tokens_as_ordinary_tokens():
    seq = Sequence(1, "r", [5, 6], SamplingParams(max_tokens=10, min_tokens=3, stop_token_ids=[9]), (2,), 100)
    assert [seq.append_token(t) for t in (2, 9, 2)] == [None, None, None]
    assert seq.append_token(9) is FinishReason.STOP
    plain = Sequence(2, "r", [5, 6], SamplingParams(max_tokens=10), (2,), 100)
    assert plain.append_token(2) is FinishReason.STOP


def test_min_tokens_above_max_tokens_names_the_field():
    with pytest.raises(ParamError) as err:
        SamplingParams(max_tokens=4, min_tokens=5)
    assert err.value.param == "min_tokens"


def test_skip_special_tokens_false_keeps_them(tok):
    text = "Hi<|im_end|>\n<|im_start|>user"
    assert _text(tok, text, SamplingParams())[0] == "Hi\nuser"
    assert _text(tok, text, SamplingParams(skip_special_tokens=False))[0] == text


def test_spaces_between_special_tokens_with_a_decoder_that_puts_spaces():
    vocab = {"[UNK]": 0, "hello": 1, "[A]": 2, "[B]": 3}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.decoder = decoders.WordPiece()   # joins tokens with spaces
    raw.add_special_tokens([AddedToken("[A]", special=True), AddedToken("[B]", special=True)])
    tok = TextTokenizer(raw, None, None, None, (), add_bos=False)
    ids = [1, 2, 3, 1]
    assert tok.decode(ids) == "hello hello"
    assert tok.decode(ids, skip_special_tokens=False) == "hello [A] [B] hello"
    assert tok.decode(ids, skip_special_tokens=False, spaces_between_special_tokens=False) == "hello [A][B] hello"
