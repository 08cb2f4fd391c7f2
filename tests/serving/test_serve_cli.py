"""`maestrale serve`'s command line: the missing extra named with its pip command, bad options, sizes."""

import importlib.util
import subprocess
import sys

import pytest

from maestrale import cli


def test_missing_extra_names_the_pip_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert cli.main(["serve"]) == 1
    assert "pip install 'maestrale[serve]'" in capsys.readouterr().err


def test_import_maestrale_pulls_no_server_packages():
    code = "import sys, maestrale; print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


@pytest.mark.parametrize("option", ["--max-num-seqs", "--num-kv-blocks", "--max-model-len", "--block-size"])
def test_non_positive_sizes_are_refused(option, capsys):
    assert cli.main(["serve", option, "0"]) == 1
    assert f"{option} must be positive, got 0" in capsys.readouterr().err


def test_memory_sizes():
    assert cli.memory_size("2GiB") == 2 << 30
    assert cli.memory_size("512MiB") == 512 << 20
    assert cli.memory_size("1.5GB") == 1_500_000_000
    assert cli.memory_size("4096") == 4096
    with pytest.raises(Exception, match="not a size"):
        cli.memory_size("lots")
