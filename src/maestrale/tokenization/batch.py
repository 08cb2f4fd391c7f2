"""BatchEncoding: what a tokenizer returns. A dict of model inputs that also reads as attributes and moves to a device."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class BatchEncoding(dict):
    """Tokenizer output: `inputs["input_ids"]`, `inputs.input_ids`, `model(**inputs)` and `inputs.to(device)` all work.

    Keeps the `tokenizers` encodings it came from (when there are any) for offset look-ups such as `char_to_token`.
    """

    def __init__(self, data: dict[str, Any] | None = None, encodings: list | None = None, tensor_type: str | None = None):
        super().__init__(data or {})
        self._encodings = encodings
        if tensor_type is not None:
            self.convert_to_tensors(tensor_type)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no field {name!r}; it holds {list(self.keys())}") from None

    def __getstate__(self) -> dict:
        return {"data": dict(self), "encodings": self._encodings}

    def __setstate__(self, state: dict) -> None:
        self.update(state["data"])
        self._encodings = state["encodings"]

    @property
    def encodings(self) -> list | None:
        return self._encodings

    def tokens(self, batch_index: int = 0) -> list[str]:
        return self._encoding(batch_index).tokens

    def word_ids(self, batch_index: int = 0) -> list[int | None]:
        return self._encoding(batch_index).word_ids

    def char_to_token(self, batch_or_char_index: int, char_index: int | None = None) -> int | None:
        batch_index, char_index = (0, batch_or_char_index) if char_index is None else (batch_or_char_index, char_index)
        return self._encoding(batch_index).char_to_token(char_index)

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> tuple[int, int] | None:
        batch_index, token_index = (0, batch_or_token_index) if token_index is None else (batch_or_token_index, token_index)
        return self._encoding(batch_index).token_to_chars(token_index)

    def _encoding(self, batch_index: int):
        if not self._encodings:
            raise ValueError("This BatchEncoding has no token/character alignment: call the tokenizer with "
                             "return_offsets_mapping=True to keep it")
        return self._encodings[batch_index]

    def convert_to_tensors(self, tensor_type: str | None) -> "BatchEncoding":
        """Turn every field into a torch tensor ("pt") or numpy array ("np"), in place."""
        if tensor_type is None:
            return self
        tensor_type = str(getattr(tensor_type, "value", tensor_type))
        if tensor_type not in ("pt", "np"):
            raise ValueError(f"return_tensors={tensor_type!r} is not supported: use 'pt' (torch), 'np' (numpy) or None")
        for key, value in self.items():
            if isinstance(value, (torch.Tensor, np.ndarray)):
                continue
            if value and isinstance(value[0], list) and len({len(row) for row in value}) > 1:
                raise ValueError(
                    f"Cannot make one tensor of {key!r}: its sequences have different lengths "
                    f"{sorted({len(row) for row in value})}. Pass padding=True (and truncation=True for long texts)."
                )
            array = np.asarray(value, dtype=np.int64)
            self[key] = torch.from_numpy(array) if tensor_type == "pt" else array
        return self

    def to(self, device: str | torch.device) -> "BatchEncoding":
        """Move every tensor to `device` (other fields are left as they are); returns self."""
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device)
        return self
