"""ImageNet (as downloaded) or an ImageFolder tree → prepared shards, as §2 down-samples it.

Every image is decoded, its shorter side scaled to 256 and the central 256×256 cut
(`Decoder.decode_square`), re-encoded as an RGB 4:2:0 JPEG and packed into tar shards
(`shards.py`). The per-pixel mean image and the RGB covariance for PCA lighting come
out of the same pass: workers return, with each chunk of encoded images, the exact
integer sums of its training pixels, and the main process adds them up, so the
statistics do not depend on the number of workers.

The source (`sources.py`) is read once, in a fixed order, by this process; chunks of
images go out to a `spawn` pool and come back in order, a bounded window in flight, so
memory stays flat and the output is the same bytes for any `--workers`. A file that
does not decode is skipped, listed with its reason in OUT/skipped.txt, and counted; it
never stops the run. CMYK JPEGs and the PNG named .JPEG are converted to RGB and counted.

Interrupted (Ctrl-C, SIGTERM, SIGKILL, power loss, a full disk), the work so far stays in
OUT.partial (`preparestate.py`) and the same command continues it: finished shards are
kept, not rewritten, and the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import re
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Callable

from alexnetd.pipeline.imagenetmeta import OFFICIAL_MD5, md5_mismatches
from alexnetd.pipeline.pixelstats import PixelStats
from alexnetd.pipeline.preparestate import ShardRecord, Workspace, WorkspaceError
from alexnetd.pipeline.progress import Progress
from alexnetd.pipeline.shards import FORMAT_VERSION, JpegCodec, KeyMaker, ShardWriter
from alexnetd.pipeline.sources import Source, SourceError, open_source

__all__ = ["prepare", "PrepareReport", "PrepareError", "DEFAULT_SHARD_SIZE", "IMAGE_SIZE"]

IMAGE_SIZE = 256  # §2: "down-sampled the images to a fixed resolution of 256 × 256"
DEFAULT_SHARD_SIZE = 256 << 20
_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
CHUNK = 32  # images per task: amortises IPC, small enough to keep all workers busy
_PNG = b"\x89PNG\r\n\x1a\n"
_OFFICIAL_FILES = frozenset(OFFICIAL_MD5)


class PrepareError(Exception):
    """A problem with the arguments or the source; one line."""


@dataclass
class PrepareReport:
    out: Path
    layout: str = ""
    converted: dict[str, int] = field(default_factory=dict)  # per split
    skipped: collections.Counter = field(default_factory=collections.Counter)  # per reason
    kinds: collections.Counter = field(default_factory=collections.Counter)  # cmyk, png: converted
    kept_shards: int = 0  # shards a resumed run found finished
    seconds: float = 0.0

    @property
    def total_converted(self) -> int:
        return sum(self.converted.values())

    def summary(self) -> str:
        n = self.total_converted
        parts = ", ".join(f"{s} {c}" for s, c in self.converted.items())
        skipped = sum(self.skipped.values())
        why = " (" + ", ".join(f"{r} {c}" for r, c in sorted(self.skipped.items())) + ")" if skipped else ""
        kinds = "".join(f", {c} {_KIND_WORDS[k][c != 1]} converted" for k, c in sorted(self.kinds.items()))
        kept = f", {self.kept_shards} finished shards kept from an earlier run" if self.kept_shards else ""
        rate = n / self.seconds if self.seconds > 0 else 0.0
        return (f"converted {n} ({parts}{kinds}), skipped {skipped}{why}{kept} in {self.seconds:.1f} s, "
                f"{rate:.0f} images/s -> {self.out}")


_KIND_WORDS = {"cmyk": ("CMYK JPEG", "CMYK JPEGs"), "png": ("PNG named .JPEG", "PNGs named .JPEG")}


# -- worker side -----------------------------------------------------------------------

_codec: JpegCodec | None = None


def _init_worker(quality: int, parent: int) -> None:
    global _codec
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C
    _codec = JpegCodec(quality)
    # A worker whose parent was killed (SIGKILL, OOM) would wait on its task queue for
    # ever; leave instead.
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _convert_chunk(task: tuple[list, bool]):
    """([(bytes | None, path | None)], with_stats) → ([(jpeg, kind) | (reason, detail)], sums | None)."""
    from alexnetd.pipeline.jpeg import SkipSample

    items, with_stats = task
    stats = PixelStats(IMAGE_SIZE) if with_stats else None
    results = []
    for data, path in items:
        try:
            if data is None:
                with open(path, "rb") as f:
                    data = f.read()
            image = _codec.decoder.decode_square(data, IMAGE_SIZE)
            results.append((_codec.encode(image, stats), _kind(data)))
        except SkipSample as exc:
            results.append((exc.reason, exc.detail))
        except OSError as exc:  # not a decoding problem: the file itself cannot be read
            results.append(("unreadable", str(exc)))
    return results, (stats.sums() if stats is not None and stats.images else None)


def _kind(data: bytes) -> str:
    """What a decodable source file needed converting from: "cmyk", "png" or ""."""
    if data[:8] == _PNG:
        return "png"
    if data[:2] == b"\xff\xd8":
        from turbojpeg import TJCS_CMYK, TJCS_YCCK

        return "cmyk" if _codec.decoder.turbo.decode_header(data)[3] in (TJCS_CMYK, TJCS_YCCK) else ""
    return ""


def _stored_sums(task: tuple[str, list[tuple[int, int]]]):
    """The pixel sums of stored shard images (a resumed run's finished shards)."""
    path, spans = task
    stats = PixelStats(IMAGE_SIZE)
    with open(path, "rb") as f:
        for offset, length in spans:
            stats.add_image(_codec.decoder.decode_rgb(os.pread(f.fileno(), length, offset)))
    return stats.sums()


# -- main side -------------------------------------------------------------------------


def prepare(
    src: str | Path,
    out: str | Path,
    quality: int = 90,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
    verify: bool = False,
    say: Callable[[str], None] | None = None,
) -> PrepareReport:
    """Convert `src` (any layout `sources.open_source` reads) to a prepared dataset at
    `out`. Raises PrepareError (one line) on bad arguments or input; undecodable images
    are skipped with a jpeg.REASONS reason, "unreadable" when the file cannot be read at
    all, or "unlabelled" for a validation file the label files do not mention. `say`
    gets the lines a user should read (the layout, notes, a resume); `progress` shows a
    bar on a terminal, a line a minute elsewhere."""
    start = time.monotonic()
    say = say or (lambda line: None)
    src, out = Path(src), Path(out)
    if not 1 <= quality <= 100:
        raise PrepareError(f"quality {quality} is not in 1..100")
    if shard_size <= 0:
        raise PrepareError(f"shard size {shard_size} is not positive")
    workers = workers or len(os.sched_getaffinity(0))
    try:
        source = open_source(src)
    except SourceError as exc:
        raise PrepareError(str(exc)) from None
    say(f"layout: {source.layout}")
    for note in source.notes:
        say(f"note: {note}")
    if verify:
        _verify(source, say)
    if out.exists():
        if not force:
            raise PrepareError(f"{out}: already exists (use --force to replace it)")
        if not out.is_dir() or not ((out / "manifest.json").is_file() or not any(out.iterdir())):
            raise PrepareError(f"{out}: exists and is not a prepared dataset; not replacing it, even with --force")
    params = {"prepare": str(src.resolve()), "layout": source.layout, "quality": quality, "shard_size": shard_size,
              "format": FORMAT_VERSION}
    report = PrepareReport(out, layout=source.layout)
    try:
        with Workspace(out, params, force) as space:
            if space.written:
                say(f"resuming: {space.dir} was complete; renaming it to {out}")
                space.rename()
                return _report_from_manifest(report, out, start)
            with contextlib.closing(_Pool(workers, quality)) as pool:
                _convert(source, space, pool, report, shard_size, progress, say)
    except WorkspaceError as exc:
        raise PrepareError(str(exc)) from None
    except BrokenProcessPool:
        raise PrepareError("a decoding worker process died (killed, out of memory, or crashed); "
                           "the finished shards are kept: run the same command to continue") from None
    report.seconds = time.monotonic() - start
    return report


def _convert(source: Source, space: Workspace, pool: "_Pool", report: PrepareReport, shard_size: int,
             progress: bool, say) -> None:
    stats = PixelStats(IMAGE_SIZE)
    done: dict[str, list[ShardRecord]] = {}
    skipped_lines: list[str] = []  # of splits whose images were all skipped (no record holds them)
    for split in source.splits:
        records = space.records(split.name)
        report.kept_shards += len(records)
        position = records[-1].next if records else (0, 0)
        if records:
            say(f"resuming {split.name}: {len(records)} finished shards kept, "
                f"{sum(r.shard['count'] for r in records)} images")
            if split.name == "train":
                _add_stored_sums(stats, space.dir, records, pool)
        if position != split.end:
            records, trailing = _convert_split(source, split, space, pool, records, position, stats,
                                               shard_size, progress)
            skipped_lines += trailing
        done[split.name] = records
        report.converted[split.name] = sum(r.shard["count"] for r in records)
    skipped_lines = [line for records in done.values() for r in records for line in r.skipped] + skipped_lines
    for line in skipped_lines:
        report.skipped[line.split("\t")[1]] += 1
    for r in (r for records in done.values() for r in records):
        report.kinds.update(r.kinds)
    if not report.converted.get("train"):
        space.discard()
        raise PrepareError(f"{source.root}: no training image could be decoded")
    space.commit(source.classes, source.names, stats, done, "".join(skipped_lines), IMAGE_SIZE,
                 {"skipped": dict(sorted(report.skipped.items()))})


def _convert_split(source, split, space, pool, records, position, stats, shard_size, progress):
    """Convert `split` from `position` on, journaling each shard as it is finished.
    Returns (records, skipped lines after the last shard that no record holds)."""
    records = list(records)
    writer = ShardWriter(space.dir / split.name, split.name, max_bytes=shard_size, first=len(records))
    keys = KeyMaker()
    for r in records:
        keys.used.update(r.keys)
    # What the shard being written covers, journaled with it once it is finished.
    pending = _Pending()
    rows_done = 0
    done_before = sum(r.shard["count"] + len(r.skipped) for r in records)
    bar = Progress(split.name, split.total, done_before, enabled=progress)

    def finish_shard(next_pos):
        nonlocal pending, rows_done
        shard = writer.shards[-1]
        rec = ShardRecord(shard, next_pos, pending.keys, pending.skipped, dict(pending.kinds),
                          writer.index_rows(rows_done, shard["count"]))
        space.record(split.name, len(records), rec)
        records.append(rec)
        rows_done += shard["count"]
        pending = _Pending()

    try:
        for chunk, (results, sums) in pool.map_chunks(split.items(position), split.name == "train"):
            if sums is not None:
                stats.add_sums(*sums)
            for item, (first, second) in zip(chunk, results):
                if item.label is None:
                    pending.skipped.append(f"{item.where}\tunlabelled\tnot in the validation labels\n")
                elif isinstance(first, bytes):
                    key = keys.make(item.stem, source.classes[item.label])
                    shards_before = len(writer.shards)
                    writer.add(key, first, item.label)
                    if len(writer.shards) > shards_before:  # this image began the next shard
                        finish_shard(item.pos)
                    pending.keys.append(key)
                    if second:
                        pending.kinds[second] += 1
                else:
                    pending.skipped.append(f"{item.where}\t{first}\t{_one_line(second)}\n")
            bar.update(len(chunk))
        shards_before = len(writer.shards)
        writer.close()
        if len(writer.shards) > shards_before:
            finish_shard(split.end)
        elif records:  # only skipped files after the last shard: they join its record
            last = records[-1]
            last.skipped.extend(pending.skipped)
            last.next = split.end
            space.record(split.name, len(records) - 1, last)
            pending = _Pending()
    finally:
        writer.abort()
        bar.close()
    return records, pending.skipped


@dataclass
class _Pending:
    keys: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    kinds: collections.Counter = field(default_factory=collections.Counter)


def _add_stored_sums(stats: PixelStats, root: Path, records: list[ShardRecord], pool: "_Pool") -> None:
    """A resumed run's statistics of the shards it kept, from their stored JPEGs: the
    same integer sums the first run had added (the sums come from the stored images)."""
    tasks = []
    for r in records:
        path = str(root / r.shard["name"])
        spans = [(int(o), int(n)) for o, n in zip(r.rows["offset"], r.rows["length"])]
        tasks += [(path, spans[i:i + 4 * CHUNK]) for i in range(0, len(spans), 4 * CHUNK)]
    for sums in pool.map(_stored_sums, tasks):
        stats.add_sums(*sums)


def _verify(source: Source, say) -> None:
    files = sorted(p for p in source.root.iterdir() if p.name in _OFFICIAL_FILES) if source.root.is_dir() else []
    if not files:
        say(f"verify: {source.layout} has no published checksums; nothing to check")
        return
    say(f"verify: checking the MD5 of {', '.join(p.name for p in files)}")
    bad = md5_mismatches(files)
    if bad:
        raise PrepareError(bad[0])
    say("verify: all match the published checksums")


def _report_from_manifest(report: PrepareReport, out: Path, start: float) -> PrepareReport:
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    report.converted = {name: info["count"] for name, info in manifest["splits"].items()}
    report.skipped.update(manifest.get("skipped", {}))
    report.seconds = time.monotonic() - start
    return report


class _Pool:
    """Tasks run in order on a spawn pool (or in this process for one worker), a bounded
    window of them in flight: memory stays flat however slow the writing is."""

    def __init__(self, workers: int, quality: int):
        self.workers = workers
        if workers <= 1:
            global _codec
            _codec = JpegCodec(quality)
            self._pool = None
        else:
            # ProcessPoolExecutor rather than Pool: a worker that dies (OOM killer, a
            # crash in a native decoder) fails its futures instead of leaving .get() waiting.
            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                             initializer=_init_worker, initargs=(quality, os.getpid()))

    def map(self, fn, tasks):
        """fn(task) for each task, in order."""
        return (result for _, result in self._ordered(fn, ((t, t) for t in tasks)))

    def map_chunks(self, items, with_stats: bool):
        """(chunk of Items, _convert_chunk's result) for each CHUNK items, in order."""
        def tasks():
            it = iter(items)
            while chunk := list(islice(it, CHUNK)):
                yield chunk, ([(i.data, i.path) for i in chunk if i.label is not None], with_stats)

        for chunk, (results, sums) in self._ordered(_convert_chunk, tasks()):
            # Unlabelled items were not sent: give them a placeholder in their place.
            it = iter(results)
            yield chunk, ([None if i.label is None else next(it) for i in chunk], sums)

    def _ordered(self, fn, tagged):
        if self._pool is None:
            for tag, task in tagged:
                yield tag, fn(task)
            return
        window = 4 * self.workers
        pending: collections.deque = collections.deque()
        for tag, task in tagged:
            if len(pending) >= window:
                tag0, future = pending.popleft()
                yield tag0, future.result()
            pending.append((tag, self._pool.submit(fn, task)))
        while pending:
            tag0, future = pending.popleft()
            yield tag0, future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _one_line(detail: str) -> str:
    """The decoder's message on one line, without object addresses (a stable report)."""
    return " ".join(_ADDRESS.sub("", detail).split())
