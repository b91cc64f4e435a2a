"""Engine errors name a setting, not a CLI flag; each front end words it its own way."""
from __future__ import annotations

import pytest

from acttail_core import cli
from acttail_core.corpora import tokenize_corpus
from acttail_core.errors import SETTING_WORDS, CorpusError, setting


def test_a_setting_reads_as_plain_words_unless_a_front_end_names_it() -> None:
    error = CorpusError(f"{setting('seqlen')} must be at least 2 tokens, got 1")
    assert str(error) == "the sequence length must be at least 2 tokens, got 1"
    assert error.worded({"seqlen": "--seqlen"}) == "--seqlen must be at least 2 tokens, got 1"
    assert error.worded({"seqlen": "Sequence length"}).startswith("Sequence length must")


def test_unknown_settings_are_refused() -> None:
    with pytest.raises(KeyError):
        setting("no_such_setting")


def test_engine_messages_carry_no_flags(tiny_loaded) -> None:
    with pytest.raises(CorpusError) as info:
        tokenize_corpus(tiny_loaded, "some text " * 50, seqlen=1)
    assert "--" not in str(info.value) and "sequence length" in str(info.value)


def test_the_cli_names_every_setting_by_its_flag() -> None:
    assert set(cli.FLAG_OF_SETTING) == set(SETTING_WORDS)
    parser = cli.build_parser()
    flags = {option for action in parser._subparsers._group_actions[0].choices.values()
             for a in action._actions for option in a.option_strings}
    assert set(cli.FLAG_OF_SETTING.values()) <= flags


def test_the_cli_prints_the_flag(capsys) -> None:
    assert cli.main(["eval", "--model", "default", "--sparsity", "0.5", "--seqlen", "1", "--max-tokens", "64"]) == 2
    err = capsys.readouterr().err
    assert "--seqlen" in err and "\x00" not in err and err.count("\n") == 1
