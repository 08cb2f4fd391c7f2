"""maestrale's own CPU product on GGUF blocks (Q4_0, Q4_1, Q8_0): gguf_kernels.cpp. The blocks are laid out once at
load with 8 rows' blocks interleaved (`interleave`), so that one pass streams 8 rows and reuses each activation block
for all of them; the layout holds the same bytes, plus zero rows to a whole group.

The C++ source is compiled on first use with the system's C++ compiler into ~/.cache/maestrale/kernels (one library
per source, torch version and instruction set, `cpu_simd`: AVX-512 with VNNI, else AVX2 + FMA + F16C, where the CPU
has them, a scalar loop otherwise) and loaded as the torch operators torch.ops.maestrale.gguf_mm and
torch.ops.maestrale.decode_attention (the CPU decode step's attention over a static cache), which Dynamo traces like
any other. Without a compiler, keep_quantized runs torch's int4 / int8 kernels instead (quantization/gguf.py), with a
one-line notice.

Activations are quantized to int8 per block of 32 inside the product, as llama.cpp does: each value moves by at most
half a step, max |x| / 254 over its block, so x @ W.T moves by at most sum over blocks of that step times the block's
sum of |w| (tests/quantization/test_gguf_kernels.py asserts this bound).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sysconfig
import tempfile
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F

from ..loading.gguf import dequantize_blocks
from ..models.linear import stacked_rows
from .weight_only import PackedWeight, QuantizedLinear

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gguf_kernels.cpp")
GGML_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 8}  # GGML's numbers, which the C++ operator takes
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # per 32 values
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"]
SIMD_FLAGS = {"avx512": [*AVX2_FLAGS, "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"], "avx2": AVX2_FLAGS,
              "scalar": []}
AVX512_CPUINFO = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # /proc/cpuinfo's names of what "avx512" needs


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "maestrale" / "kernels"


@cache
def cpu_simd() -> str:
    """The widest of SIMD_FLAGS' instruction sets this CPU runs: "avx512" where torch reports AVX512 and the CPU lists
    VNNI (Linux's /proc/cpuinfo), "avx2" where torch reports AVX2 or AVX512 (FMA and F16C come with it), else
    "scalar"."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        try:
            with open("/proc/cpuinfo") as f:
                flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
        except OSError:
            flags = set()
        if AVX512_CPUINFO <= flags:
            return "avx512"
    return "avx2" if capability in ("AVX2", "AVX512") else "scalar"


def library(simd: str, namespace: str = "maestrale") -> tuple[Path, list[str]]:
    """Where the library built from this source, torch version and SIMD_FLAGS[simd] is cached, and its flags."""
    flags = SIMD_FLAGS[simd] + [f"-DMAESTRALE_OPS={namespace}"]
    key = hashlib.sha256(SOURCE.read_bytes() + f"{torch.__version__} {flags}".encode()).hexdigest()[:16]
    return cache_dir() / f"gguf_kernels-{namespace}-{key}.so", flags


def build(simd: str, namespace: str = "maestrale") -> Path:
    """The compiled library (built now unless cached); raises RuntimeError with the compiler's message."""
    from torch.utils import cpp_extension

    target, flags = library(simd, namespace)
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    command = [compiler, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", *flags,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{path}" for path in cpp_extension.include_paths()), f"-I{sysconfig.get_paths()['include']}",
               str(SOURCE), f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning(f"compiling maestrale's GGUF CPU kernels ({simd}) into {target.parent}: once, ~10 s")
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = os.path.join(scratch, target.name)
        result = subprocess.run([*command, "-o", built], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}:\n{result.stderr[-2000:]}")
        os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes
    return target


@cache
def available() -> bool:
    """Whether torch.ops.maestrale.gguf_mm is loaded (compiling it on the first call); a notice when it cannot be."""
    try:
        torch.ops.load_library(str(build(cpu_simd())))
    except (RuntimeError, OSError) as error:
        logger.warning(f"keep_quantized: maestrale's GGUF CPU kernels did not build, torch's int4/int8 kernels run "
                       f"instead (slower): {str(error).splitlines()[0]}")
        return False
    torch.library.register_fake("maestrale::gguf_mm")(_fake_mm)
    torch.library.register_fake("maestrale::decode_attention")(_fake_attention)
    return True


def _fake_mm(x: torch.Tensor, weight: torch.Tensor, ggml_type: int, rows: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], rows, dtype=torch.float32)


def _fake_attention(q, k_cache, v_cache, seq_mask, t, scale):
    return torch.empty_like(q)


def decode_attention(q, k_cache, v_cache, seq_mask, t, scale: float) -> torch.Tensor:
    """engine/kernels.py's decode_attention_torch on CPU in float32, reading only the slots that hold a token."""
    return torch.ops.maestrale.decode_attention(q, k_cache, v_cache, seq_mask, t, scale)


GROUP = 8  # rows whose blocks are interleaved (gguf_kernels.cpp's group_tile)
CHUNK_ROW = [0, 1, 4, 5, 2, 3, 6, 7]  # the order of a group's rows in its quantized bytes, its own inverse
HEAD_BYTES = {"Q4_0": 2, "Q4_1": 4, "Q8_0": 2}  # a block's scale (and minimum), before its quantized bytes


def interleave(gguf_type: str, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks from the file, (rows, bytes a row), laid out as group_tile reads them: (groups, bytes), per block of 32
    columns the 8 rows' d (and m), then their quantized bytes in 8-byte chunks (bytes 0-7 of each row in CHUNK_ROW
    order, then bytes 8-15, and so on). Rows are padded with zero blocks to a whole group."""
    size, head, rows = BLOCK_BYTES[gguf_type], HEAD_BYTES[gguf_type], blocks.shape[0]
    grouped = F.pad(blocks, (0, 0, 0, -rows % GROUP)).view(-1, GROUP, blocks.shape[1] // size, size)
    scales = grouped[..., :head].unflatten(-1, (-1, 2)).permute(0, 2, 3, 1, 4)  # (groups, block, d/m, row, 2)
    values = grouped[:, CHUNK_ROW, :, head:].unflatten(-1, (-1, 8)).permute(0, 2, 3, 1, 4)  # (.., chunk, row, 8)
    return torch.cat([scales.flatten(2), values.flatten(2)], dim=-1).flatten(1)


def deinterleave(gguf_type: str, groups: torch.Tensor) -> torch.Tensor:
    """interleave's inverse on (..., blocks, bytes per block of a group): the file's blocks, (..., 8, blocks, size)."""
    head = HEAD_BYTES[gguf_type]
    scales = groups[..., :head * GROUP].unflatten(-1, (-1, GROUP, 2))  # (..., block, d/m, row, 2)
    values = groups[..., head * GROUP:].unflatten(-1, (-1, GROUP, 8))[..., CHUNK_ROW, :]  # (..., block, chunk, row, 8)
    return torch.cat([scales.movedim(-2, -4).flatten(-2), values.movedim(-2, -4).flatten(-2)], dim=-1)


def stacked_blocks(linears) -> BlocksWeight | None:
    """The GGUF blocks of bias-free QuantizedLinear layers that read the same input, as one BlocksWeight: a decode
    step then quantizes the input once and runs one product instead of several.

    The blocks are laid out once (models/linear.py's stacked_rows), so nothing is stored twice. None where the
    layers are not all such layers of one GGUF type and dtype.
    """
    weights = [linear.weight for linear in linears]
    if any(type(linear) is not QuantizedLinear or linear.bias is not None or linear._forward_hooks
           or linear._forward_pre_hooks or not isinstance(w, BlocksWeight) for linear, w in zip(linears, weights)):
        return None
    first = weights[0]
    if any((w.kind, w.dtype, w.blocks.shape[1]) != (first.kind, first.dtype, first.blocks.shape[1]) for w in weights):
        return None
    if len(weights) == 1:
        return first
    if any(w.shape[0] % GROUP for w in weights[:-1]):
        return None  # a padded group inside would put its zero rows among the outputs
    blocks = stacked_rows([w.blocks for w in weights], lambda i, rows: setattr(weights[i], "blocks", rows))
    return BlocksWeight(first.kind, blocks, sum(w.shape[0] for w in weights), first.shape[1], first.dtype)


class BlocksWeight(PackedWeight):
    """A Q4_0, Q4_1 or Q8_0 weight of (rows, cols) run by gguf_mm, held as uint8 blocks interleaved (groups of 8 rows,
    bytes a group)."""

    def __init__(self, gguf_type: str, blocks: torch.Tensor, rows: int, cols: int, dtype: torch.dtype):
        super().__init__(gguf_type, (rows, cols))
        self.ggml_type, self.dtype = GGML_TYPES[gguf_type], dtype
        self.register_buffer("blocks", blocks.contiguous())

    @classmethod
    def from_file(cls, gguf_type: str, blocks: torch.Tensor, dtype: torch.dtype) -> BlocksWeight:
        """From a GGUF tensor's blocks as stored, (rows, bytes a row)."""
        rows, cols = blocks.shape[0], blocks.shape[1] // BLOCK_BYTES[gguf_type] * 32
        return cls(gguf_type, interleave(gguf_type, blocks), rows, cols, dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.maestrale.gguf_mm(x, self.blocks, self.ggml_type, self.shape[0])

    def rows(self, index) -> torch.Tensor:
        """The dequantized rows at `index` (any shape): an embedding lookup."""
        size = BLOCK_BYTES[self.kind]
        index = torch.as_tensor(index, device=self.blocks.device)  # the rows' groups as the file's blocks, then each
        groups = deinterleave(self.kind, self.blocks.unflatten(-1, (-1, size * GROUP))[index // GROUP])  # row's own
        return self._values(torch.take_along_dim(groups, (index % GROUP)[..., None, None, None], dim=-3).squeeze(-3))

    def dequantize(self) -> torch.Tensor:
        size = BLOCK_BYTES[self.kind]
        blocks = deinterleave(self.kind, self.blocks.unflatten(-1, (-1, size * GROUP))).flatten(0, 1)
        return self._values(blocks[:self.shape[0]])

    def _values(self, blocks: torch.Tensor) -> torch.Tensor:
        """Float rows from the file's blocks, (..., blocks, bytes a block): the values the float model loads."""
        return dequantize_blocks(self.kind, blocks.flatten(-2)).to(self.dtype)
