import pytest

from neo_common.config import NeoConfig
from neo_common.settings import ConfigError


def test_flags_override_env_override_defaults():
    cfg = NeoConfig.from_args(["--port", "9000"], env={"NEO_PORT": "7000", "NEO_BLOCK_SIZE": "32",
                                                        "NEO_OFFLOAD_MODE": "auto"})
    assert cfg.http.port == 9000 and cfg.cache.block_size == 32 and cfg.scheduler.offload_mode == "auto"
    assert cfg.model.model == "smollm2-135m-instruct"


def test_round_trip_through_args_and_env():
    cfg = NeoConfig.from_args(["--max-num-seqs", "7", "--device", "cpu", "--num-gpu-blocks", "99"], env={})
    assert NeoConfig.from_args(cfg.to_args(), env={}) == cfg
    assert NeoConfig.from_args([], env=cfg.to_env()) == cfg


@pytest.mark.parametrize("argv,needle", [(["--block-size", "12"], "--block-size"),
                                         (["--gpu-memory-utilization", "2"], "--gpu-memory-utilization"),
                                         (["--device", "tpu"], "--device"),
                                         (["--worker-addr", "localhost"], "--worker-addr")])
def test_invalid_values_name_the_flag(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        NeoConfig.from_args(argv, env={})


def test_bad_env_value_names_the_variable():
    with pytest.raises(ConfigError, match="NEO_PORT"):
        NeoConfig.from_args([], env={"NEO_PORT": "eighty"})


def test_help_shows_each_default_and_never_a_secret(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    NeoConfig.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    assert "[default 256; env NEO_MAX_NUM_SEQS]" in text and "[default 'off'; env NEO_OFFLOAD_MODE]" in text
    assert "[default ''; env NEO_API_KEY]" in text


def test_neo_version_prints_the_package_version(capsys):
    from neo_common import cli

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"neo {cli.version()}" and cli.version() != "unknown"
