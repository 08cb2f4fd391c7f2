"""maestrale's GGUF container reader against the gguf package's GGUFReader, and its errors on broken files."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter

import maestrale
from conftest import GGUF_NAME
from maestrale.loading.gguf_file import GGUFFile


def test_known_types_have_gguf_s_numbers_names_and_block_sizes():
    from gguf import GGML_QUANT_SIZES

    from maestrale.loading.gguf_file import BLOCK_SIZES, GGMLType

    for kind in GGMLType:
        assert kind == Q[kind.name] and BLOCK_SIZES[kind] == GGML_QUANT_SIZES[Q[kind.name]]


def test_the_default_model_loads_without_importing_gguf(smollm2_folder):
    import subprocess
    import sys

    code = (f"import sys, maestrale; p = {str(smollm2_folder)!r}; "
            f"maestrale.AutoTokenizer.from_pretrained(p, gguf_file={GGUF_NAME!r}); "
            f"maestrale.AutoModelForCausalLM.from_pretrained(p, gguf_file={GGUF_NAME!r}); "
            "print(sorted(m for m in ('gguf', 'mistral_common') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"  # importing gguf costs ~0.3 s of a first answer (it imports mistral_common)


def test_real_file_reads_as_gguf_reads_it(smollm2_folder):
    path = f"{smollm2_folder}/{GGUF_NAME}"
    ours, theirs = GGUFFile(path), GGUFReader(path)
    expected = {name: field.contents() for name, field in theirs.fields.items() if not name.startswith("GGUF.")}
    assert ours.fields == expected
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 49152 and len(ours.fields["tokenizer.ggml.merges"]) > 40000
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, their in zip(ours.tensors, theirs.tensors):
        assert mine.shape == tuple(int(d) for d in reversed(their.shape)) and mine.tensor_type == their.tensor_type
        assert np.array_equal(mine.data.reshape(-1).view(np.uint8), their.data.reshape(-1).view(np.uint8)), mine.name


def write_small(path, alignment=None):
    writer = GGUFWriter(str(path), "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_string("general.name", "héllo ✓")
    writer.add_array("tokenizer.ggml.tokens", ["a", "", "日本", "<s>"])
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.0, 2.25, 0.0])
    writer.add_bool("general.flag", True)
    writer.add_uint64("general.big", 2**40)
    writer.add_tensor("w", np.arange(96, dtype=np.float32).reshape(3, 32))
    writer.add_tensor("h", np.ones((2, 128), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("alignment", [None, 64])
def test_fields_tensors_and_alignment(tmp_path, alignment):
    path = tmp_path / "small.gguf"
    write_small(path, alignment)
    file = GGUFFile(path)
    assert file.fields["general.name"] == "héllo ✓" and file.fields["general.flag"] is True
    assert file.fields["general.big"] == 2**40
    assert file.fields["tokenizer.ggml.tokens"] == ["a", "", "日本", "<s>"]
    assert file.fields["tokenizer.ggml.scores"] == [0.5, -1.0, 2.25, 0.0]
    w, h = file.tensors
    assert (w.name, w.shape, w.tensor_type, h.shape, h.tensor_type) == ("w", (3, 32), Q.F32, (2, 128), Q.F16)
    assert np.array_equal(w.data.view(np.float32), np.arange(96, dtype=np.float32).reshape(3, 32))
    assert np.array_equal(h.data.view(np.float16), np.ones((2, 128), dtype=np.float16))


@pytest.mark.parametrize("damage,message", [
    (lambda b: b"GGUX" + b[4:], "does not start with the GGUF magic bytes"),
    (lambda b: b[:4] + (1).to_bytes(4, "little") + b[8:], "GGUF version 0x1 is not 2 or 3"),
    (lambda b: b[:4] + (3).to_bytes(4, "big") + b[8:], "is not 2 or 3 \\(or the file is big-endian\\)"),
    (lambda b: b[:100], "truncated|unpack_from requires"),  # cut inside the metadata
    (lambda b: b[:b.index("日本".encode()) + 2], "a string runs past the end of the file: it is truncated"),
    (lambda b: b[:-100], "tensor 'h' runs past the end of the file: it is truncated"),
    (lambda b: b"", "cannot mmap an empty file"),
    (lambda b: b.replace(b"general.alignment\x04\x00\x00\x00\x40", b"general.alignment\x04\x00\x00\x00\x00"),
     "general.alignment is 0, not a positive multiple of 8"),
])
def test_broken_files_name_the_file_and_the_fault(tmp_path, damage, message):
    path = tmp_path / "small.gguf"
    write_small(path, alignment=64)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(OSError, match=rf"{path} is not a readable GGUF file \(.*({message})"):
        GGUFFile(path)
    with pytest.raises(OSError, match="is not a readable GGUF file"):  # the loader says the same
        maestrale.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="small.gguf")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf does not exist"):
        GGUFFile(tmp_path / "missing.gguf")
