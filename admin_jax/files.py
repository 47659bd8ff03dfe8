"""Whole-file writes to a workdir that may be a local folder or a bucket (gs://, s3://).

Every file a job writes (config.json, metrics.jsonl, omega.json, plots, CSV tables, eval
outputs, spm.model) goes through `write_bytes` or `write_text`, so readers, including a resumed run
or another process, never see a half-written file, whatever the storage. Reads use
`etils.epath.Path` directly; orbax writes checkpoints through the same library.
"""

import csv
import io
import os
from collections.abc import Iterable, Sequence

from etils import epath


def is_remote(path: epath.PathLike) -> bool:
  """True for URLs such as gs://bucket/run: no folders, no rename, no append."""
  return '://' in os.fspath(path)


def write_bytes(path: epath.PathLike, data: bytes) -> None:
  """Replaces the file at `path` with `data` in one step.

  Locally: a temporary file renamed over the target (atomic on POSIX), parent folders created.
  Object stores publish an object only once its upload completes, so a plain write is already
  all-or-nothing there, and they need no folders; their "rename" would be a copy and a delete.
  """
  path = epath.Path(path)
  if is_remote(path):
    path.write_bytes(data)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f'{path.name}.tmp{os.getpid()}')
  tmp.write_bytes(data)
  tmp.replace(path)


def write_text(path: epath.PathLike, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(path, text.encode('utf-8'))


def write_csv(path: epath.PathLike, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
  """`write_text` of a CSV table: a header line, then one line per row."""
  text = io.StringIO(newline='')
  writer = csv.writer(text)
  writer.writerow(header)
  writer.writerows(rows)
  write_text(path, text.getvalue())
