"""Checkpoint I/O for moesurgeon: read Hugging Face checkpoints lazily, write patched copies cheaply.

A leaf package: it imports only the standard library, torch and safetensors,
and knows nothing about model families; it moves tensors and files.

- `CheckpointReader(model_dir)`: validated, lazy, one-shard-at-a-time reads;
  a checkpoint is untrusted input (`paths.py`: what belongs to it).
- `write_patched_checkpoint(source_dir, out_dir, Patch(...))`: an atomic,
  verified patched copy that reuses unchanged shards (reflinks; hard links only
  for read-only sources or on request; else copies: `file_copy.py`), its
  weight files named as one HF series.
- `SourceBytes` (`tensor_source`, `rows_source`): a patch value made of byte
  ranges of a source file (a renamed tensor, kept dim-0 rows), streamed by the
  writer and never loaded. `ComputedTensor(dtype, shape, compute)`: a patch
  value computed only when the writer writes it, then dropped.
- `output_checks.check_output_location(...)`: every check on a target that can
  run before the long work.
"""

from .checkpoint_reader import CheckpointReader, TensorInfo
from .errors import CheckpointError
from .lazy_sources import ComputedTensor, SourceBytes, rows_source, tensor_source
from .patch_writer import Patch, WriteReport, write_patched_checkpoint
from .safetensors_format import ShardHeader, TensorEntry, read_header
from .shard_layout import parse_size

__all__ = [
    "CheckpointError",
    "CheckpointReader",
    "ComputedTensor",
    "Patch",
    "ShardHeader",
    "SourceBytes",
    "TensorEntry",
    "TensorInfo",
    "WriteReport",
    "parse_size",
    "read_header",
    "rows_source",
    "tensor_source",
    "write_patched_checkpoint",
]
