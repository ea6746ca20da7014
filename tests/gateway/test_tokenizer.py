"""Our GGUF-built tokenizer vs transformers' GGUF tokenizer (reference), and the detokenizer."""

import os

import pytest

from neo_common.model_source import embedded_gguf_path
from neo_gateway.detokenizer import IncrementalDetokenizer
from neo_gateway.tokenizer import TextTokenizer

TEXTS = ["The capital of France is", "Hello, world! 12345 numbers  and   spaces\n\nnew lines",
         "<|im_start|>user\nhi<|im_end|>", "naïve café — 日本語 emoji 🤖", "  leading spaces", "don't I'll we've"]


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.from_gguf(embedded_gguf_path())


def test_matches_transformers_gguf_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(embedded_gguf_path())
    ref = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False,
                                                                        add_generation_prompt=True)
    assert tok.eos_token_ids == (2,)


def test_incremental_detokenization_reassembles_multibyte_text(tok):
    text = "naïve café — 日本語 🤖 done"
    d = IncrementalDetokenizer(tok, [])
    deltas = [d.add(t) for t in tok.encode(text)]
    assert "".join(deltas) + d.flush() == text
    assert all("\ufffd" not in x for x in deltas), "never emit half a character"


def test_stop_string_cuts_text_and_is_never_streamed(tok):
    text = "alpha beta STOP gamma"
    d = IncrementalDetokenizer(tok, ["STOP", "zzz"])
    streamed = ""
    for t in tok.encode(text):
        streamed += d.add(t)
        assert "S" not in streamed.replace("alpha beta ", ""), "a possible stop prefix is held back"
        if d.stopped:
            break
    streamed += d.flush()
    assert d.stopped and streamed == "alpha beta "


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tok):
    d = IncrementalDetokenizer(tok, ["STOP"])
    out = "".join(d.add(t) for t in tok.encode("a ST b")) + d.flush()
    assert out == "a ST b" and not d.stopped


def test_saved_folder_loads_back_identical(tok, tmp_path):
    tok.save(str(tmp_path))
    back = TextTokenizer.from_hf_folder(str(tmp_path))
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)
    messages = [{"role": "user", "content": "hi"}]
    assert back.apply_chat_template(messages) == tok.apply_chat_template(messages)
    assert back.eos_token_ids == tok.eos_token_ids
