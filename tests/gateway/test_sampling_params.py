import pytest

from neo_gateway.param_error import ParamError
from neo_gateway.sampling_params import SamplingParams


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -0.1), ("temperature", float("nan")),
                                         ("top_p", 0.0), ("top_p", 1.5), ("top_k", 0), ("top_k", -2),
                                         ("seed", -1), ("stop", [""]), ("stop_token_ids", [-3])])
def test_out_of_range_values_name_their_field(field, value):
    with pytest.raises(ParamError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field


def test_defaults_are_openai_like():
    p = SamplingParams()
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.greedy) == (16, 1.0, 1.0, -1, None, False)
    assert SamplingParams(temperature=0).greedy
