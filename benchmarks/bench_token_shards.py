"""Today's token shards (memory-mapped .npy, data/shards.py) vs ArrayRecord (Grain's random-access format).

    python benchmarks/bench_token_shards.py [--tokens 20000000] [--seq-len 2048] [--reads 20000]

Writes the same documents (Zipf-distributed ids over a 50k vocabulary, log-normal lengths: a stand-in
for a tokenized web corpus) both ways and prints, per format: bytes per token on disk, write MB/s
(of uint16 tokens), and reads per second of what the pipeline asks for: a whole random document, and
a random window of seq_len + 1 tokens (one packed row). ArrayRecord stores one document per record
(zstd level 3, its default; also uncompressed, and zstd in groups of 64 records).

Decision (measured here: 2-core CPU, 20M tokens, warm page cache; figures in the README's
Benchmarks): token shards stay as they are; ArrayRecord is not adopted. It is smaller, not faster:
with zstd (its default) 1.46 bytes/token against 2.01 for web-length documents and 1.23 against
2.00 for book-length ones, but every read decodes a whole record, so a random window (one packed row,
what the pipeline reads for every row, in random order now that rows are shuffled) costs 20x (web)
to 60x (books) more: 7k and 2.7k windows/s per thread against 146k and 161k from a memory map, which
copies only the window; grouping records (group_size:64) is smaller still but 50 windows/s on books,
and uncompressed ArrayRecord is no smaller than .npy and still 20x slower. The same disk saving is
available without a second format: the .npy compressed in 128 KiB zstd-3 records (what a ZFS dataset
with compression=zstd stores) is 1.22 bytes/token, while reads stay memory-mapped slices. Our shards
also keep the layout of Megatron's .bin, which the teams moving here already have. (The ids are
synthetic, Zipf-distributed; real token streams compress differently, but alike for every format.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow
from array_record.python import array_record_module

from plamo_jax.data import shards

VOCAB = 50_000


def synthetic_documents(total_tokens: int, log_mean_length: float, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    documents, count = [], 0
    while count < total_tokens:
        length = int(np.clip(rng.lognormal(mean=log_mean_length, sigma=1.0), 16, 500_000))
        ids = np.minimum(rng.zipf(1.15, size=length), VOCAB - 1).astype(np.uint16)
        documents.append(ids)
        count += length
    return documents


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_npy(directory: Path, documents: list[np.ndarray]) -> None:
    directory.mkdir()
    shards.write_shard(directory, 0, documents, np.dtype(np.uint16), job_key="bench")


def write_array_record(path: Path, documents: list[np.ndarray], options: str) -> None:
    writer = array_record_module.ArrayRecordWriter(str(path), options)
    for document in documents:
        writer.write(document.tobytes())
    writer.close()


class NpyReader:
    def __init__(self, directory: Path):
        self.offsets = np.load(directory / "shard-00000.offsets.npy")
        self.tokens = np.load(directory / "shard-00000.tokens.npy", mmap_mode="r")

    def document(self, index: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[index] : self.offsets[index + 1]], np.int32)

    def window(self, index: int, begin: int, length: int) -> np.ndarray:
        start = self.offsets[index] + begin
        return np.asarray(self.tokens[start : min(start + length, self.offsets[index + 1])], np.int32)


class ArrayRecordDocuments:
    def __init__(self, path: Path):
        self.reader = array_record_module.ArrayRecordReader(str(path), "readahead_buffer_size:0")

    def document(self, index: int) -> np.ndarray:
        return np.frombuffer(self.reader.read([index])[0], np.uint16).astype(np.int32)

    def window(self, index: int, begin: int, length: int) -> np.ndarray:
        return self.document(index)[begin : begin + length]  # a record is read (decoded) whole


def reads_per_second(read, count: int, budget_seconds: float = 4.0) -> float:
    """read(k) for k = 0, 1, ... up to `count` calls or the time budget, whichever comes first."""
    start = time.perf_counter()
    done = 0
    while done < count and (done % 64 or time.perf_counter() - start < budget_seconds):
        read(done)
        done += 1
    return done / (time.perf_counter() - start)


FORMATS = {
    "token shards (.npy, mmap)": (write_npy, None, NpyReader),
    "ArrayRecord zstd:3 (default)": (write_array_record, "group_size:1", ArrayRecordDocuments),
    "ArrayRecord zstd:3, group_size:64": (write_array_record, "group_size:64", ArrayRecordDocuments),
    "ArrayRecord uncompressed": (write_array_record, "group_size:1,uncompressed", ArrayRecordDocuments),
}


def compare(documents: list[np.ndarray], seq_len: int, reads: int, scratch: Path) -> None:
    lengths = np.array([len(d) for d in documents])
    total = int(lengths.sum())
    print(f"\n{len(documents)} documents, {total} tokens (mean {lengths.mean():,.0f} per document), "
          f"windows of {seq_len + 1} tokens, warm page cache")
    rng = np.random.default_rng(1)
    picks = rng.integers(0, len(documents), size=reads)
    begins = [int(rng.integers(0, max(1, lengths[i] - seq_len))) for i in picks]
    print(f"{'format':36s} {'bytes/token':>11s} {'write MB/s':>10s} {'documents/s':>12s} {'windows/s':>10s}")
    for number, (name, (write, options, reader_class)) in enumerate(FORMATS.items()):
        path = scratch / f"format{number}-{len(documents)}"
        start = time.perf_counter()
        write(path, documents) if options is None else write(path, documents, options)
        write_seconds = time.perf_counter() - start
        size = directory_bytes(path) if path.is_dir() else path.stat().st_size
        reader = reader_class(path)
        for index in picks[:200]:  # warm the page cache and the reader
            reader.document(int(index))
        whole = reads_per_second(lambda k, reader=reader: reader.document(int(picks[k])), reads)
        windows = reads_per_second(
            lambda k, reader=reader: reader.window(int(picks[k]), begins[k], seq_len + 1), reads)
        print(f"{name:36s} {size / total:11.3f} {2 * total / write_seconds / 1e6:10.1f} "
              f"{whole:12,.0f} {windows:10,.0f}")
    tokens_file = scratch / f"format0-{len(documents)}" / "shard-00000.tokens.npy"
    compressed = filesystem_compressed_bytes(tokens_file)
    print(f"{'token shards on a zstd filesystem':36s} {compressed / total:11.3f}"
          "   (estimate: the .npy in 128 KiB records, zstd level 3, as ZFS compression=zstd stores it)")


def filesystem_compressed_bytes(path: Path, record_bytes: int = 128 << 10) -> int:
    data = path.read_bytes()
    codec = pyarrow.Codec("zstd", compression_level=3)
    return sum(len(codec.compress(data[at : at + record_bytes], asbytes=True))
               for at in range(0, len(data), record_bytes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--reads", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for log_mean_length in (6.0, 10.5):  # web pages (~650 tokens), books (~50k tokens)
            documents = synthetic_documents(args.tokens, log_mean_length)
            compare(documents, args.seq_len, args.reads, Path(scratch))


if __name__ == "__main__":
    main()
