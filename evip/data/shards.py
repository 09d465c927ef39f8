"""Tar shards in the webdataset / img2dataset layout, readable by sample index.

A shard is a tar whose consecutive members sharing a key (the basename up to its first dot) form
one sample: `000123.jpg`, `000123.txt`, `000123.json`. Two readers:

- `IndexedTar` (a local, seekable file): one pass over the 512-byte headers (member data is skipped
  with a seek, never read) builds the sample index; then any sample is read with one seek per
  member. This is what makes restoring a position O(1) and a per-shard seeded permutation possible.
- `PipeTar` (`pipe:CMD`, e.g. `pipe:aws s3 cp s3://b/x.tar -`): forward-only; sample j is reached
  by reading past the earlier members' bytes (no decoding), at most one shard's worth.

A truncated shard keeps the samples before the break; the break itself is reported once as
`truncated` (see `Shard.truncated`).
"""
from __future__ import annotations

import glob
import os
import subprocess
import tarfile
from dataclasses import dataclass

from braceexpand import braceexpand


BLOCK = 512


def _blocks(n: int) -> int:
    return (n + BLOCK - 1) // BLOCK * BLOCK


def _end_marker_problem(path: str, end: int, size: int) -> str:
    """tarfile ends quietly at a header cut short; a whole tar has >= 2 zero blocks after `end`."""
    if size - end < 2 * BLOCK:
        return f"cut after byte {size}: no end-of-archive blocks after the last member (byte {end})"
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(2 * BLOCK).strip(b"\0"):
            return f"cut inside the header at byte {end}"
    return ""


def expand_paths(patterns: list[str]) -> list[str]:
    """Brace ranges, then globs; `pipe:` commands pass through (brace-expanded). Sorted per pattern,
    duplicates dropped, order of patterns kept: the result is the same on every rank."""
    out: list[str] = []
    for pattern in patterns:
        for p in braceexpand(str(pattern)):
            if p.startswith("pipe:"):
                out.append(p)
            elif glob.has_magic(p):
                out += sorted(glob.glob(os.path.expanduser(p)))
            elif os.path.exists(os.path.expanduser(p)):
                out.append(os.path.expanduser(p))
    seen: set[str] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def split_key(name: str) -> tuple[str, str]:
    """webdataset's rule: key = dir + basename up to the first dot, ext = the rest, lower-cased."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (os.path.join(d, stem) if d else stem), ext.lower()


@dataclass
class TarSample:
    key: str
    members: list[tuple[str, int, int]]      # (ext, data offset, size)


class IndexedTar:
    """Random access to the samples of one local tar shard."""

    random_access = True

    def __init__(self, path: str):
        self.path = path
        self.truncated = ""                   # non-empty: where/why the shard breaks
        self.samples = self._index()
        self._fh = None

    def _index(self) -> list[TarSample]:
        size = os.path.getsize(self.path)
        samples: list[TarSample] = []
        end = 0                               # end of the last member's data blocks
        try:
            with tarfile.open(self.path, mode="r:") as tf:
                while True:
                    try:
                        m = tf.next()
                    except (tarfile.ReadError, EOFError, OSError) as e:
                        self.truncated = f"header after member {len(samples)} samples: {e}"
                        break
                    if m is None:
                        self.truncated = _end_marker_problem(self.path, end, size)
                        break
                    end = m.offset_data + _blocks(m.size)
                    if not m.isfile():
                        continue
                    if m.offset_data + m.size > size:
                        self.truncated = f"member {m.name} ends at {m.offset_data + m.size} > file size {size}"
                        break
                    key, ext = split_key(m.name)
                    if samples and samples[-1].key == key:
                        samples[-1].members.append((ext, m.offset_data, m.size))
                    else:
                        samples.append(TarSample(key, [(ext, m.offset_data, m.size)]))
        except tarfile.ReadError as e:
            self.truncated = f"not a readable tar: {e}"
        if self.truncated and samples:
            samples.pop()                     # the last sample may miss members cut off by the break
        return samples

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, j: int) -> tuple[str, dict[str, bytes]]:
        if self._fh is None:
            self._fh = open(self.path, "rb")
        s = self.samples[j]
        out = {}
        for ext, off, n in s.members:
            self._fh.seek(off)
            out[ext] = self._fh.read(n)
        return s.key, out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class PipeTar:
    """Forward-only reading of a tar produced by a shell command (`pipe:CMD`)."""

    random_access = False

    def __init__(self, url: str):
        self.path = url
        self.truncated = ""
        self._proc = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        self._raw = _TailReader(self._proc.stdout)
        self._tf = tarfile.open(fileobj=self._raw, mode="r|")
        self._end = 0
        self._next_index = 0
        self._pending: tuple[str, str, bytes] | None = None   # first member of the next sample
        self._done = False

    def __len__(self) -> int:                 # unknown until the end: read() raises IndexError
        raise TypeError("a pipe: shard has no length before it is read to the end")

    def _member(self):
        if self._pending is not None:
            p, self._pending = self._pending, None
            return p
        if self._done:
            return None
        try:
            m = self._tf.next()
            while m is not None and not m.isfile():
                m = self._tf.next()
            if m is None:
                self._done = True
                self.truncated = self._raw.end_problem(self._end)
                return None
            self._end = m.offset_data + _blocks(m.size)
            data = self._tf.extractfile(m).read()
            if len(data) != m.size:
                raise EOFError(f"member {m.name} has {len(data)} of {m.size} bytes")
        except (tarfile.ReadError, EOFError, OSError) as e:
            self.truncated = f"stream breaks after {self._next_index} samples: {e}"
            self._done = True
            return None
        return (*split_key(m.name), data)

    def _next_sample(self):
        first = self._member()
        if first is None:
            return None
        key, ext, data = first
        members = {ext: data}
        while True:
            m = self._member()
            if m is None:
                if self.truncated:
                    return None               # the last sample may be incomplete
                break
            if m[0] != key:
                self._pending = m
                break
            members[m[1]] = m[2]
        return key, members

    def read(self, j: int) -> tuple[str, dict[str, bytes]]:
        if j < self._next_index:
            raise ValueError(f"{self.path}: pipe shards read forward only ({j} < {self._next_index})")
        while True:
            s = self._next_sample()
            if s is None:
                raise IndexError(j)
            self._next_index += 1
            if self._next_index - 1 == j:
                return s

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


class _TailReader:
    """A read-only file object that counts bytes and keeps the last ones (to check the end)."""

    KEEP = 1 << 16

    def __init__(self, f):
        self.f, self.total, self.tail = f, 0, b""

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.total += len(b)
        self.tail = (self.tail + b)[-self.KEEP:]
        return b

    def end_problem(self, end: int) -> str:
        while self.read(1 << 16):
            pass
        rest = self.total - end
        if rest < 2 * BLOCK:
            return f"stream cut after byte {self.total}: no end-of-archive blocks after byte {end}"
        if rest <= self.KEEP and self.tail[-rest:][: 2 * BLOCK].strip(b"\0"):
            return f"stream cut inside the header at byte {end}"
        return ""


def open_tar(path: str):
    return PipeTar(path) if path.startswith("pipe:") else IndexedTar(path)
