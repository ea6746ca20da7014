"""Device-side sampling fields through the official ``openai`` client on a real replica:
``logit_bias`` and ``min_p`` change the tokens as they should; out-of-range values get a 400."""

from __future__ import annotations

import openai
import torch
import pytest

from neo_common.model_source import embedded_gguf_path
from neo_gateway.tokenizer import TextTokenizer
from support.clients import openai_client

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
PROMPT = "The best fruit in the world is"


@pytest.fixture(scope="module")
def client(small_pool_replica):
    return openai_client(small_pool_replica.url)


@pytest.fixture(scope="module")
def tok():
    return TextTokenizer.from_gguf(embedded_gguf_path())


def test_a_large_logit_bias_forces_a_token_and_a_negative_one_bans_it(client, tok):
    [banana] = tok.encode(" banana", add_special_tokens=False)
    forced = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4,
                                       logit_bias={str(banana): 100})
    assert forced.choices[0].text == " banana" * 4
    base = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4).choices[0].text
    first = tok.encode(base, add_special_tokens=False)[0]
    banned = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=4,
                                       logit_bias={str(first): -100}).choices[0].text
    assert tok.encode(banned, add_special_tokens=False)[0] != first


def test_logit_bias_in_chat(client, tok):
    [yes] = tok.encode("Yes", add_special_tokens=False)
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}],
                                         temperature=0, max_tokens=3, logit_bias={str(yes): 100})
    assert out.choices[0].message.content == "Yes" * 3


def test_min_p_one_keeps_only_the_likeliest_token(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, temperature=0, max_tokens=8).choices[0].text
    for seed in range(3):
        out = client.completions.create(model=MODEL, prompt=PROMPT, temperature=1.0, max_tokens=8, seed=seed,
                                        extra_body={"min_p": 1.0})
        assert out.choices[0].text == greedy
    free = {client.completions.create(model=MODEL, prompt=PROMPT, temperature=1.5, max_tokens=8, seed=s)
            .choices[0].text for s in range(3)}
    assert free != {greedy}, "without min_p these seeds sample other text"


@pytest.mark.parametrize("fields,param", [({"logit_bias": {"999999": 1}}, "logit_bias"),
                                          ({"logit_bias": {"5": 101}}, "logit_bias"),
                                          ({"logit_bias": {"five": 1}}, "logit_bias"),
                                          ({"min_p": 1.5}, "min_p"),
                                          ({"repetition_penalty": 0}, "repetition_penalty"),
                                          ({"frequency_penalty": 2.5}, "frequency_penalty")])
def test_out_of_range_values_get_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body=fields)
    assert err.value.body["param"] == param


def _reference_greedy(runner, prompt: list[int], steps: int, pres: float, freq: float, rep: float) -> list[int]:
    """Greedy decoding with vLLM's penalty formulas applied in the test to the model's logits."""
    from support.equivalence import last_logits

    out: list[int] = []
    for _ in range(steps):
        logits = last_logits(runner, prompt + out).clone()
        counts = torch.bincount(torch.tensor(out, dtype=torch.int64), minlength=logits.shape[0]).to(logits.dtype)
        seen = counts > 0
        if rep != 1.0:
            seen_any = seen.clone()
            seen_any[prompt] = True
            logits = torch.where(seen_any, torch.where(logits > 0, logits / rep, logits * rep), logits)
        logits = logits - freq * counts - pres * seen.to(logits.dtype)
        out.append(int(logits.argmax()))
    return out


def test_penalties_equal_a_reference_on_the_same_model(client, tok):
    from support.equivalence import runner_for
    from neo_common.model_source import ModelSource

    runner = runner_for(ModelSource("gguf", embedded_gguf_path(), "smollm2"), 256)
    prompt = tok.encode("1, 1, 1, 1, 1, 1, 1,", add_special_tokens=False)
    plain = _reference_greedy(runner, prompt, 12, 0.0, 0.0, 1.0)
    for pres, freq, rep in [(0.5, 1.0, 1.0), (0.0, 0.0, 1.8)]:
        want = _reference_greedy(runner, prompt, 12, pres, freq, rep)
        assert want != plain, "the penalties change the greedy text of this prompt"
        got = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12,
                                        presence_penalty=pres, frequency_penalty=freq,
                                        extra_body={"repetition_penalty": rep, "ignore_eos": True})
        assert got.choices[0].text == tok.decode(want)
