from pathlib import Path

from neo_common.config_doc import BEGIN, END, markdown_table


def test_readme_configuration_table_is_current():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == markdown_table(), "regenerate with: python -c 'from neo_common.config_doc import " \
                                      "markdown_table; print(markdown_table())'"
