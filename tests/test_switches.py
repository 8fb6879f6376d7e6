import pytest

from herd.errors import ConfigError
from herd.switches import env_switch


@pytest.mark.parametrize("raw, expected", [("1", True), ("ON", True), (" yes ", True), ("true", True),
                                           ("0", False), ("Off", False), ("no", False), ("false", False)])
def test_env_switch_spellings(monkeypatch, raw, expected):
    monkeypatch.setenv("HERD_TEST_SWITCH", raw)
    assert env_switch("HERD_TEST_SWITCH", not expected) is expected


def test_env_switch_default_when_unset_or_empty(monkeypatch):
    monkeypatch.delenv("HERD_TEST_SWITCH", raising=False)
    assert env_switch("HERD_TEST_SWITCH", True) is True
    monkeypatch.setenv("HERD_TEST_SWITCH", "")
    assert env_switch("HERD_TEST_SWITCH", False) is False


def test_env_switch_typo_is_an_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("HERD_TEST_SWITCH", "of")
    with pytest.raises(ConfigError, match="HERD_TEST_SWITCH='of'"):
        env_switch("HERD_TEST_SWITCH", True)
