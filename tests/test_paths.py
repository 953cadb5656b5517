"""Where minigpt keeps its cache and its data."""

from minigpt_cli import paths
from minigpt_cli.paths import data_dir


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MINIGPT_CACHE_DIR", str(tmp_path / "m"))
    assert paths.cache_dir() == tmp_path / "m"
    monkeypatch.delenv("MINIGPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert paths.cache_dir() == tmp_path / "x" / "minigpt"


def test_data_dir_follows_xdg(data_home, monkeypatch, tmp_path):
    monkeypatch.delenv("MINIGPT_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert data_dir() == tmp_path / "minigpt"
