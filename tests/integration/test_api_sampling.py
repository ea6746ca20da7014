"""Device-side sampling fields through the official ``openai`` client on a real replica:
``logit_bias`` and ``min_p`` change the tokens as they should; out-of-range values get a 400."""

from __future__ import annotations

import openai
import pytest

from neo_common.model_source import embedded_gguf_path
from neo_gateway.tokenizer import TextTokenizer

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m-instruct"
PROMPT = "The best fruit in the world is"


@pytest.fixture(scope="module")
def client(small_pool_replica):
    return openai.OpenAI(base_url=small_pool_replica.url + "/v1", api_key="unused", max_retries=0, timeout=300)


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
                                          ({"min_p": 1.5}, "min_p")])
def test_out_of_range_values_get_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, extra_body=fields)
    assert err.value.body["param"] == param
