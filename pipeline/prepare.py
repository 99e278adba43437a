"""ImageFolder tree → prepared shards, as §2 of the paper down-samples ImageNet.

Every image is decoded, its shorter side scaled to 256 and the central 256×256 cut
(`Decoder.decode_square`), re-encoded as an RGB 4:2:0 JPEG and packed into tar shards
(`shards.py`). The per-pixel mean image and the RGB covariance for PCA lighting come
out of the same pass: workers return, with each chunk of encoded images, the exact
integer sums of its training pixels, and the main process adds them up, so the
statistics do not depend on the number of workers.

Order is deterministic: classes sorted, files sorted, train then val; chunks go out to
a `spawn` pool and are taken back in order, a bounded window of them in flight. A file that does not decode is skipped,
listed with its reason in OUT/skipped.txt, and counted; it never stops the run. CMYK,
grayscale and PNG-named-JPEG files are converted to RGB by the decoder.

The output appears only when complete (built in OUT.tmp-<pid>, renamed at the end).
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
from pathlib import Path

from tqdm import tqdm

from alexnetd.pipeline.dataset import ImageFolderDataset, open_dataset
from alexnetd.pipeline.pixelstats import PixelStats
from alexnetd.pipeline.shards import JpegCodec, PreparedWriter

__all__ = ["prepare", "PrepareReport", "PrepareError", "DEFAULT_SHARD_SIZE", "IMAGE_SIZE"]

IMAGE_SIZE = 256  # §2: "down-sampled the images to a fixed resolution of 256 × 256"
DEFAULT_SHARD_SIZE = 256 << 20
_ADDRESS = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")
CHUNK = 32  # images per task: amortises IPC, small enough to keep all workers busy


class PrepareError(Exception):
    """A problem with the arguments or the source tree; one line."""


@dataclass
class PrepareReport:
    out: Path
    converted: dict[str, int] = field(default_factory=dict)  # per split
    skipped: collections.Counter = field(default_factory=collections.Counter)  # per reason
    seconds: float = 0.0

    @property
    def total_converted(self) -> int:
        return sum(self.converted.values())

    def summary(self) -> str:
        n = self.total_converted
        parts = ", ".join(f"{s} {c}" for s, c in self.converted.items())
        skipped = sum(self.skipped.values())
        why = " (" + ", ".join(f"{r} {c}" for r, c in sorted(self.skipped.items())) + ")" if skipped else ""
        rate = n / self.seconds if self.seconds > 0 else 0.0
        return (
            f"converted {n} ({parts}), skipped {skipped}{why} in {self.seconds:.1f} s, "
            f"{rate:.0f} images/s -> {self.out}"
        )


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


def _convert_chunk(task: tuple[str, list[str], bool]):
    """(split, paths, with_stats) → ([jpeg bytes | (reason, detail)], stats arrays | None)."""
    from alexnetd.pipeline.jpeg import SkipSample

    split, paths, with_stats = task
    stats = PixelStats(IMAGE_SIZE) if with_stats else None
    results = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                data = f.read()
            image = _codec.decoder.decode_square(data, IMAGE_SIZE)
            results.append(_codec.encode(image, stats))
        except SkipSample as exc:
            results.append((exc.reason, exc.detail))
        except OSError as exc:  # not a decoding problem: the file itself cannot be read
            results.append(("unreadable", str(exc)))
    partial = stats.sums() if stats is not None and stats.images else None
    return results, partial


# -- main side -------------------------------------------------------------------------


def prepare(
    src: str | Path,
    out: str | Path,
    quality: int = 90,
    shard_size: int = DEFAULT_SHARD_SIZE,
    workers: int | None = None,
    force: bool = False,
    progress: bool = True,
) -> PrepareReport:
    """Convert the ImageFolder tree `src` (train/<class>/*, optional val/<class>/*) to a
    prepared dataset at `out`. Raises PrepareError or DatasetError (one line each) on bad
    arguments or input; undecodable images are skipped with a jpeg.REASONS reason (or
    "unreadable" when the file cannot be read at all)."""
    start = time.monotonic()
    src, out = Path(src), Path(out)
    if not 1 <= quality <= 100:
        raise PrepareError(f"quality {quality} is not in 1..100")
    if shard_size <= 0:
        raise PrepareError(f"shard size {shard_size} is not positive")
    workers = workers or len(os.sched_getaffinity(0))
    ds = open_dataset(src)
    if not isinstance(ds, ImageFolderDataset):
        raise PrepareError(f"{src}: already a prepared dataset")
    if out.exists():
        if not force:
            raise PrepareError(f"{out}: already exists (use --force to replace it)")
        if not out.is_dir() or not ((out / "manifest.json").is_file() or not any(out.iterdir())):
            raise PrepareError(f"{out}: exists and is not a prepared dataset; not replacing it, even with --force")

    splits = [(name, ds.split(name)) for name in ds.splits]
    tasks = (  # lazy: only the window in flight exists at a time
        (name, [sp.path(i) for i in range(lo, min(lo + CHUNK, len(sp)))], name == "train")
        for name, sp in splits
        for lo in range(0, len(sp), CHUNK)
    )
    report = PrepareReport(out)
    skipped_lines = []
    total = sum(len(sp) for _, sp in splits)
    with PreparedWriter(out, ds.classes, ds.class_names, size=IMAGE_SIZE, force=force) as writer, tqdm(
        total=total, desc=f"prepare {src.name}", unit="img", disable=not progress, smoothing=0.1
    ) as bar, contextlib.closing(_run(tasks, workers, quality)) as results:
        for name, sp in splits:
            writer.begin(name, max_bytes=shard_size)
            converted = 0
            for lo in range(0, len(sp), CHUNK):
                chunk, partial = next(results)
                if partial is not None:
                    writer.stats.add_sums(*partial)
                for i, item in enumerate(chunk, start=lo):
                    rel = sp.key(i)
                    if isinstance(item, bytes):
                        stem = os.path.splitext(os.path.basename(rel))[0]
                        label = int(sp.labels[i])
                        writer.add(writer.key(stem, ds.classes[label]), item, label)
                        converted += 1
                    else:
                        reason, detail = item
                        report.skipped[reason] += 1
                        skipped_lines.append(f"{rel}\t{reason}\t{_one_line(detail)}\n")
                bar.update(len(chunk))
            writer.end()
            report.converted[name] = converted
        if not report.converted.get("train"):
            raise PrepareError(f"{src / 'train'}: no training image could be decoded")
        (writer.tmp / "skipped.txt").write_text("".join(skipped_lines))
        report.seconds = time.monotonic() - start
        writer.commit(
            {
                "source": {"prepare": str(src.resolve()), "quality": quality, "shard_size": shard_size},
                "skipped": dict(sorted(report.skipped.items())),
            }
        )
    report.seconds = time.monotonic() - start
    return report


def _run(tasks, workers: int, quality: int):
    """Yield each task's result in task order, from a spawn pool (or in-process for 1)."""
    if workers <= 1:
        global _codec
        _codec = JpegCodec(quality)
        for task in tasks:
            yield _convert_chunk(task)
        return
    # A bounded window of tasks in flight: memory stays flat however slow the writing is.
    # ProcessPoolExecutor rather than Pool: a worker that dies (OOM killer, a crash in
    # a native decoder) fails its futures instead of leaving .get() waiting forever.
    window = 4 * workers
    pending: collections.deque = collections.deque()
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                               initargs=(quality, os.getpid()))
    try:
        for task in tasks:
            if len(pending) >= window:
                yield _result(pending.popleft())
            pending.append(pool.submit(_convert_chunk, task))
        while pending:
            yield _result(pending.popleft())
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _result(future):
    try:
        return future.result()
    except BrokenProcessPool:
        raise PrepareError("a decoding worker process died (killed, out of memory, or crashed); nothing was written") from None


def _one_line(detail: str) -> str:
    """The decoder's message on one line, without object addresses (a stable report)."""
    return " ".join(_ADDRESS.sub("", detail).split())
