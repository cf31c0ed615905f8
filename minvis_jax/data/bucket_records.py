"""Random access to the array_record shards of a prepared TFDS split in a bucket, record by record,
without copying the shards to local disk.

array_record's reader opens local files only. A shard written by TFDS (writer option group_size:1)
holds one record per riegeli chunk, so a record's bytes are one contiguous byte range of the object:
  - once per shard: its chunk boundaries, walking the 40-byte chunk headers from the file start to
    the footer (whose offset the postscript in the last 64 KiB block gives), plus the file's head
    (signature) and tail (footer, postscript) kept in memory;
  - per record: one range read of its chunk, written at its own offset into a sparse local file of
    the shard's size that holds only head, chunk and tail, read back by array_record's own reader
    (which checks the chunk's hashes) and deleted at once.
So the local staging holds one record per reading thread, never a shard; the decoded example is
the one `tfds.data_source` returns for a local copy (same bytes, same `deserialize_example_np`).
"""

import concurrent.futures
import os
import struct
import tempfile

from array_record.python import array_record_module

from minvis_jax import paths

_BLOCK = 1 << 16          # riegeli puts a block header at every multiple of 64 KiB
_BLOCK_HEADER = 24
_CHUNK_HEADER = 40   # hash, data size, data hash, type (1 byte), records (7 bytes), decoded size
_RECORDS_CHUNK = ord('r')

# Where records are staged (None: the system's temporary folder, TMPDIR). Tests point it elsewhere.
STAGING_DIR: str | None = None


def _advance(pos: int, length: int) -> int:
  """The file position `length` chunk bytes after `pos`, block headers skipped."""
  while length > 0:
    if pos % _BLOCK == 0:
      pos += _BLOCK_HEADER
    step = min(length, _BLOCK - pos % _BLOCK)
    pos, length = pos + step, length - step
  return pos


def _without_block_headers(data: bytes, start: int) -> bytes:
  """The chunk bytes of file bytes `data` read from position `start` (block headers removed)."""
  out, pos = [], start
  while pos < start + len(data):
    if pos % _BLOCK == 0:
      pos += _BLOCK_HEADER
      continue
    end = min(start + len(data), (pos // _BLOCK + 1) * _BLOCK)
    out.append(data[pos - start:end - start])
    pos = end
  return b''.join(out)


def _varint(data: bytes, i: int) -> tuple[int, int]:
  value, shift = 0, 0
  while True:
    byte = data[i]
    value |= (byte & 0x7f) << shift
    i, shift = i + 1, shift + 7
    if not byte & 0x80:
      return value, i


class _Shard:
  """The chunk boundaries of one array_record object, and its head and tail bytes."""

  def __init__(self, path: str):
    self.path = path
    self.size = paths.getsize(path)
    if self.size == 0 or self.size % _BLOCK:
      raise self._bad(f'size {self.size} is not a whole number of 64 KiB blocks')
    footer = self._footer_offset()
    begins, ends, pos = [], [], 0
    while pos < footer:
      chunk_type, num_records, end = self._chunk(pos)
      if chunk_type == _RECORDS_CHUNK and num_records:
        if num_records != 1:
          raise self._bad(f'chunk at byte {pos} holds {num_records} records (TFDS writes one a '
                          'chunk, group_size:1; rebuild the dataset)')
        begins.append(pos)
        ends.append(end)
      pos = end
    if pos != footer:
      raise self._bad(f'the chunks end at byte {pos}, the footer begins at byte {footer}')
    self.begins, self.ends = begins, ends
    self.head = paths.read_range(path, 0, begins[0] if begins else footer)
    self.footer = footer
    self.tail = paths.read_range(path, footer, self.size)

  def _bad(self, why: str) -> ValueError:
    return ValueError(f'{self.path}: not an array_record shard this reader can stream ({why})')

  def _chunk(self, pos: int) -> tuple[int, int, int]:
    """(type, records, end position) of the chunk that begins at `pos`."""
    raw = paths.read_range(self.path, pos, min(_advance(pos, _CHUNK_HEADER), self.size))
    header = _without_block_headers(raw, pos)
    if len(header) != _CHUNK_HEADER:
      raise self._bad(f'chunk header at byte {pos} is cut off')
    data_size = struct.unpack_from('<Q', header, 8)[0]
    chunk_type = header[24]
    num_records = int.from_bytes(header[25:32], 'little')
    end = _advance(pos, _CHUNK_HEADER + data_size)
    if end > self.size:
      raise self._bad(f'chunk at byte {pos} runs past the end of the file')
    return chunk_type, num_records, end

  def _footer_offset(self) -> int:
    """The footer's position, from the postscript chunk that starts the last block (its records
    are stored uncompressed: compression byte 0, sizes, then records; field 1 = footer offset)."""
    begin = self.size - _BLOCK
    raw = paths.read_range(self.path, begin, self.size)
    chunk = _without_block_headers(raw, begin)
    data_size = struct.unpack_from('<Q', chunk, 8)[0]
    data = chunk[_CHUNK_HEADER:_CHUNK_HEADER + data_size]
    if len(data) != data_size or not data or data[0] != 0:
      raise self._bad('no uncompressed postscript in the last block')
    sizes_length, i = _varint(data, 1)
    record = data[i + sizes_length:]
    if not record or record[0] != 0x08:   # field 1, varint
      raise self._bad('the postscript has no footer offset')
    offset, _ = _varint(record, 1)
    if not 0 < offset < begin + _BLOCK:
      raise self._bad(f'footer offset {offset} out of range')
    return offset

  def read(self, index: int) -> bytes:
    """Record `index` of this shard (its serialized example)."""
    chunk = paths.read_range(self.path, self.begins[index], self.ends[index])
    with tempfile.NamedTemporaryFile(prefix='minvis-record-', suffix='.array_record',
                                     dir=STAGING_DIR) as f:
      f.truncate(self.size)   # sparse: only what is written below takes disk space
      for pos, data in ((0, self.head), (self.begins[index], chunk), (self.footer, self.tail)):
        f.seek(pos)
        f.write(data)
      f.flush()
      reader = array_record_module.ArrayRecordReader(
          f.name, 'readahead_buffer_size:0,max_parallelism:0')
      try:
        return reader.read([index])[0]
      finally:
        reader.close()


class BucketRecords:
  """The records of a TFDS split's file instructions (shards in a bucket), indexable like
  `array_record_data_source.ArrayRecordDataSource`; `decode(bytes)` turns one into an example."""

  def __init__(self, file_instructions, decode, threads: int = 8):
    self._decode = decode
    instructions = list(file_instructions)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(threads, len(instructions)))) as pool:
      shards = list(pool.map(lambda fi: _Shard(os.fspath(fi.filename)), instructions))
    self._ranges = []   # (shard, first record in it) per example, in split order
    for fi, shard in zip(instructions, shards):
      if fi.skip + fi.take > len(shard.begins):
        raise shard._bad(f'{len(shard.begins)} records, the split expects at least '
                         f'{fi.skip + fi.take}')
      self._ranges += [(shard, fi.skip + k) for k in range(fi.take)]

  def __len__(self) -> int:
    return len(self._ranges)

  def __getitem__(self, key: int):
    shard, index = self._ranges[key]
    return self._decode(shard.read(index))

