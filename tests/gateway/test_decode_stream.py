"""The detokenizer's DecodeStream path streams exactly what the window decoder (the detokenizer
before DecodeStream, kept for the options DecodeStream cannot express) streams: random token
sequences of the embedded model's vocabulary with multi-byte characters split across tokens and
special tokens, every option, stop strings that end inside a token."""

import itertools
import random

import pytest
from tokenizers import Tokenizer, decoders, models

from neo_common.model_source import embedded_gguf_path
from neo_gateway.detokenizer import IncrementalDetokenizer, StreamDecoder, WindowDecoder
from neo_gateway.tokenizer import TextTokenizer

MULTIBYTE = "naïve café — 日本語 emoji 🤖 ñ ü ß € 한국어 🇫🇷 ∑"
OPTIONS = list(itertools.product([True, False], [True, False], [True, False]))  # skip, spaces, include_stop


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.from_gguf(embedded_gguf_path())


def _sequences(tok, count, seed):
    """Random ids: plain vocabulary, special tokens, and byte tokens of multi-byte characters
    (cut mid-character wherever a sequence starts or stops inside them)."""
    rng = random.Random(seed)
    specials, multibyte = list(tok.added_tokens), tok.encode(MULTIBYTE)
    for _ in range(count):
        out = []
        for _ in range(rng.randint(1, 40)):
            r = rng.random()
            if r < 0.1:
                out.append(rng.choice(specials))
            elif r < 0.35:
                start = rng.randrange(len(multibyte))
                out.extend(multibyte[start:start + rng.randint(1, 4)])
            else:
                out.append(rng.randrange(tok.vocab_size))
        yield out


def _run(detok, ids, stop_last=False):
    steps = [detok.add(t, stop_token=stop_last and i == len(ids) - 1) for i, t in enumerate(ids)]
    return steps + [detok.flush()], detok.stopped


def _pair(tok, stop, min_tokens, skip, spaces, include):
    new = IncrementalDetokenizer(tok, stop, min_tokens, include, skip, spaces)
    old = IncrementalDetokenizer(tok, stop, min_tokens, include, skip, spaces)
    old.decoder = WindowDecoder(tok, skip, spaces)   # the decoding as it was before DecodeStream
    return new, old


def test_options_pick_the_decoder(tok):
    assert isinstance(IncrementalDetokenizer(tok, []).decoder, StreamDecoder)
    assert isinstance(IncrementalDetokenizer(tok, [], skip_special_tokens=False).decoder, StreamDecoder)
    assert isinstance(IncrementalDetokenizer(tok, [], skip_special_tokens=False,
                                             spaces_between_special_tokens=False).decoder, WindowDecoder)


@pytest.mark.parametrize("skip,spaces,include", OPTIONS)
def test_same_deltas_as_the_window_decoder(tok, skip, spaces, include):
    compared = 0
    for ids in _sequences(tok, 150, seed=hash((skip, spaces, include)) & 0xffff):
        new, old = _pair(tok, [], 0, skip, spaces, include)
        stop_last = len(ids) % 3 == 0
        assert _run(new, ids, stop_last) == _run(old, ids, stop_last), ids
        compared += 1
    assert compared == 150


@pytest.mark.parametrize("skip", [True, False])
def test_same_deltas_with_stop_strings_cut_inside_tokens(tok, skip):
    """Stop strings taken from the decoded text at random places: most start or end inside a token."""
    rng, cut = random.Random(7 + skip), 0
    for ids in _sequences(tok, 200, seed=11 + skip):
        text = tok.decode(ids, skip_special_tokens=skip)
        if len(text) < 4:
            continue
        at = rng.randrange(len(text) - 2)
        stop = [text[at:at + rng.randint(1, 6)], "never in the text \x00"]
        for include, min_tokens in ((False, 0), (True, 0), (False, len(ids) // 2)):
            new, old = _pair(tok, stop, min_tokens, skip, True, include)
            got, want = _run(new, ids), _run(old, ids)
            assert got == want, (ids, stop)
            cut += want[1]
    assert cut > 100, "most sequences end at their stop string"


def test_text_of_a_whole_sequence_equals_its_decode(tok):
    for ids in _sequences(tok, 100, seed=3):
        steps, _ = _run(IncrementalDetokenizer(tok, []), ids)
        whole = tok.decode(ids)
        assert all("\ufffd" not in s for s in steps[:-1]) or "\ufffd" in whole
        assert whole.startswith("".join(steps))   # all of it but an incomplete last character


def test_a_refused_step_carries_on_through_windows():
    """A decoder whose window texts are not prefixes of each other: DecodeStream raises its
    InvalidPrefix; the detokenizer goes on through the window decoder with the same deltas."""
    class Reversed:
        def decode_chain(self, tokens):
            return ["".join(tokens)[::-1]]

    raw = Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2}, unk_token="a"))
    raw.decoder = decoders.Decoder.custom(Reversed())
    tok = TextTokenizer(raw, None, None, None, (), False)
    ids = [0, 1, 2, 0, 1, 1, 2]
    new, old = _pair(tok, [], 0, True, True, False)
    assert _run(new, ids) == _run(old, ids)
    assert new.decoder._fallback is not None
