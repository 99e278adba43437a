"""`--decoder dali`: JPEG decode with NVIDIA DALI inside the trainer process.

The other side of the decoder seam (the default is the CPU augmenter processes writing
the ring, pipeline/augment.py). Here no augmenter process runs: a thread of the trainer
process takes the loader's jobs (raw JPEG bytes) itself and has DALI do the whole of the
paper's input transform on the device (device="mixed": nvJPEG or the hardware JPEG
decoder, so the JPEGs cross PCIe compressed), in one of two pipelines:
- a prepared 256x256 JPEG: each training sample's random 224 crop is decoded straight
  (`fn.decoders.image_crop`), then mirrored (`fn.flip`); a validation image whole;
- any other size (an ImageFolder tree, unprepared data): the §2 down-sampling (shorter
  side to 256, the central 256x256) and the crop in one resampling. Only the window of
  the image that the crop needs is decoded (`fn.decoders.image_slice`), `fn.resize`
  maps the crop's interval of the source to 224x224 with the host path's filter (its
  geometry: pipeline/daliwindow.py), then `fn.flip`; a validation image's window is its
  central square, resized to 256x256.
The crop, flip and lighting draws are the same deterministic ones the augmenters send
(plan.train_draws), and the thread sends the copier the same "ready" message, so order,
labels, crops and everything after the decode are those of the CPU path.

On a machine without CUDA the same pipelines run on DALI's CPU backend, which is how the
tests exercise them; there the decode uses libjpeg-turbo's accurate IDCT and fancy
upsampling, so its pixels equal `Decoder(fast=False)`'s bit for bit (tested), and a
full-size image's crop is within one level of the host's accurate decode + resize + crop
wherever the filter's support lies inside the central square (tests/test_dali.py derives
the bound, and the one at the square's edges). The CPU augmenters differ more: their fast
IDCT and fast upsampling (bounded there for prepared images) and, for a full-size image,
their DCT-scaled decode (a large image decoded at 1/2, 1/4 ... of its size, then
resized), a different low-pass than resizing the full decode. EXIF orientation is
ignored, as libjpeg-turbo on the host ignores it.

Bad input never reaches DALI, because a DALI error invalidates the whole pipeline:
- on the host, every sample's header is read first (magic, pixel budget, colour space,
  size) and a stream without its end-of-image marker is treated as suspect; header
  failures are skipped and counted like the CPU path's;
- what DALI is not given (not a JPEG, CMYK, suspect) is decoded on the host by
  `Decoder`, cut and mirrored there and sent to the device;
- if DALI still fails on a batch, its pipeline is dropped (the next batch builds a
  fresh one) and that batch is decoded on the host, so a file DALI rejects costs one
  slower batch and is skipped and counted exactly as the CPU path would.
Every image decoded is counted by path, DALI or the host fallback with its reason, and
sent with the thread's beats (`paths`), so that `status` shows when the device path is
not the one running (pipeline/decoders.py, DaliDecoding).
One difference remains, by choice: a stream damaged inside its entropy-coded data but
with all its markers is decoded by DALI as libjpeg-turbo does when its warning is
ignored (grey where data is missing), while the CPU path turns that warning into a
skip. Finding it on the host would mean decoding everything twice; and `prepare`
decodes every image and keeps only clean ones in the shards it writes.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.daliwindow import crop_windows
from alexnetd.pipeline.jobbytes import JobBytesReader
from alexnetd.pipeline.jobloop import job_sockets, run_jobs
from alexnetd.pipeline.jpeg import DEFAULT_MAX_PIXELS, Decoder, SkipSample
from alexnetd.pipeline.plan import train_draws
from alexnetd.pipeline.ring import CROP, IMAGE
from alexnetd.pipeline.stage import Heartbeat, StageClock

__all__ = ["DaliDecoder", "DaliAugmenter", "dali_missing", "FALLBACK_REASONS"]

_EOI = b"\xff\xd9"
# Why an image was decoded on the host instead of by DALI (the keys of `paths`).
FALLBACK_REASONS = ("cmyk", "not_jpeg", "no_eoi", "dali_error")


def dali_missing() -> str | None:
    """Why DALI cannot be used here (one line), or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing its own way
        return (f"--decoder dali needs NVIDIA DALI: pip install 'alexnetd[dali]' "
                f"(import nvidia.dali failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    return None


class DaliDecoder:
    """DALI pipelines: encoded JPEGs + per-sample crop and mirror -> uint8 NHWC on the device.

    Synchronous (exec_pipelined=False): one batch in, one batch out. The overlap with
    training comes from running in its own thread while the trainer steps, as every
    other stage overlaps; DALI's own prefetching would need inputs fed ahead of time.
    The square pipeline (256x256 JPEGs) is built at once, so a broken install shows at
    start; the window pipeline (any other size) when a first such image comes, so
    prepared shards never pay for it."""

    def __init__(self, batch: int, device: torch.device, threads: int = 2):
        self.batch, self.device, self.threads = batch, torch.device(device), threads
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._pipes: dict = {}
        self._pipe("square")

    def _pipe(self, kind: str):
        if kind not in self._pipes:
            self._pipes[kind] = self._build(kind)
        return self._pipes[kind]

    def _build(self, kind: str):
        from nvidia.dali import fn, pipeline_def, types

        cuda = self.device.type == "cuda"
        # use_fast_idct is the CPU backend's; False keeps libjpeg-turbo's accurate IDCT.
        # EXIF orientation is ignored: the host decoder ignores it, and the crop's
        # geometry is computed in the stored frame.
        decode = dict(device="mixed" if cuda else "cpu", output_type=types.RGB, adjust_orientation=False,
                      **({} if cuda else {"use_fast_idct": False}))
        # Both pipelines run one batch at a time, synchronously, in this thread.
        run = dict(batch_size=self.batch, num_threads=self.threads, device_id=(self.device.index or 0) if cuda else None,
                   exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)

        @pipeline_def(**run)
        def square():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            pos_x = fn.external_source(name="pos_x", dtype=types.FLOAT)
            pos_y = fn.external_source(name="pos_y", dtype=types.FLOAT)
            side = fn.external_source(name="side", dtype=types.FLOAT)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            images = fn.decoders.image_crop(jpegs, crop_w=side, crop_h=side, crop_pos_x=pos_x, crop_pos_y=pos_y,
                                            **decode)
            return fn.flip(images, horizontal=mirror)

        @pipeline_def(**run)
        def window():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            anchor = fn.external_source(name="anchor", dtype=types.INT32)
            shape = fn.external_source(name="shape", dtype=types.INT32)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT)
            size = fn.external_source(name="size", dtype=types.FLOAT)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            # Integer anchor and shape: absolute pixels of the stored image, "WH" order.
            images = fn.decoders.image_slice(jpegs, anchor, shape, **decode)
            # The host path's filter (resample.py): a triangle widened to the scale
            # when shrinking (antialias) and plain bilinear when enlarging.
            images = fn.resize(images, size=size, roi_start=roi_start, roi_end=roi_end,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            return fn.flip(images, horizontal=mirror)

        pipe = {"square": square, "window": window}[kind]()
        pipe.build()
        return pipe

    def decode(self, blobs: list, tops: np.ndarray, lefts: np.ndarray, flips: np.ndarray, side: int) -> torch.Tensor:
        """(n, side, side, 3) uint8 on the device: each 256x256 JPEG's window at (top, left),
        mirrored where flipped. Raises whatever DALI raises, after dropping the pipeline."""
        n = len(blobs)
        # crop_pos is the window's anchor as a fraction of the room left: a position
        # in 0..32 over 32 is exact in binary, so DALI lands on the same pixel.
        room = max(IMAGE - side, 1)
        return self._run("square", (n, side, side, 3), dict(
            jpegs=blobs, pos_x=[np.float32(v / room) for v in lefts], pos_y=[np.float32(v / room) for v in tops],
            side=[np.float32(side)] * n, mirror=[np.int32(v) for v in flips]))

    def decode_full(self, blobs: list, widths, heights, tops: np.ndarray, lefts: np.ndarray, flips: np.ndarray,
                    side: int) -> torch.Tensor:
        """(n, side, side, 3) uint8 on the device: JPEGs of any size, each down-sampled as
        §2 says (shorter side to 256, central square) and cut at (top, left) of that
        256x256 frame, mirrored where flipped; only the window the cut needs is decoded.
        Raises whatever DALI raises, after dropping the pipeline."""
        n = len(blobs)
        win = crop_windows(widths, heights, tops, lefts, side)
        return self._run("window", (n, side, side, 3), dict(
            jpegs=blobs, anchor=list(win.anchor), shape=list(win.shape), roi_start=list(win.roi_start),
            roi_end=list(win.roi_end), size=[np.array([side, side], np.float32)] * n,
            mirror=[np.int32(v) for v in flips]))

    def _run(self, kind: str, shape: tuple, inputs: dict) -> torch.Tensor:
        try:
            pipe = self._pipe(kind)
            for name, values in inputs.items():
                pipe.feed_input(name, values)
            (images,) = pipe.run()
        except Exception:
            self._pipes.pop(kind, None)  # a DALI error leaves the pipeline unusable
            raise
        return self._to_torch(images, shape)

    def _to_torch(self, images, shape) -> torch.Tensor:
        tensor = images.as_tensor()
        if self._stream is None:
            return torch.from_numpy(np.array(tensor)).reshape(shape)
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(shape, dtype=torch.uint8, device=self.device)
        # The block may have been freed by a step still queued on the default stream:
        # the copy waits for that work before it overwrites it.
        self._stream.wait_stream(torch.cuda.default_stream(self.device))
        feed_ndarray(tensor, out, cuda_stream=self._stream.cuda_stream)
        self._stream.synchronize()  # note: blocks this thread only
        return out


class DaliAugmenter:
    """The augmenter stage as a thread of the trainer process: jobs in, device batches out.

    Decoded batches wait in `decoded[(generation, epoch, seq)]` for the copier, which takes
    them instead of reading a ring slot; the ring slots stay what bounds the work in
    flight (the loader still needs a credit per batch). `paths` counts the images
    decoded by DALI and, by reason, by the host fallback."""

    def __init__(self, endpoints: dict, seed: int, batch: int, device, rank: int = 0,
                 max_pixels: int | None = None, threads: int = 2, job_bytes: JobBytesReader | None = None):
        self.ends, self.seed, self.rank = endpoints, seed, rank
        self.decoded: dict = {}
        self.decoder = DaliDecoder(batch, device, threads)
        self.host = Decoder(max_pixels=max_pixels or DEFAULT_MAX_PIXELS, fast=False)  # DALI's own IDCT
        self.clock = StageClock()
        self.paths = {"dali_decoded": 0, "host_fallback": {}}
        self.device = self.decoder.device
        # Reads the jobs' bytes from the loader's shared-memory segments (named after the ring).
        self.job_bytes = job_bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dali", daemon=True)
        self.error: BaseException | None = None
        self._generation = None

    def start(self) -> "DaliAugmenter":
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # surfaced by the copier through `error`
            self.error = exc
            raise

    def _loop(self) -> None:
        ctx = zmq.Context.instance()
        jobs, ready = job_sockets(ctx, self.ends, ready_linger=0)
        # Reported as the augmenter stage, so status and the bottleneck view stay true.
        # `paths` goes with every beat: the dict itself, read when each beat is sent,
        # by this thread, the only one that changes it.
        beat = Heartbeat(ctx, self.ends.get("beats"), "augmenter", index=0, rank=self.rank, in_trainer=True,
                         paths=self.paths)
        try:
            run_jobs(jobs, ready, self.clock, beat, self.augment, self._stop.is_set, self.job_bytes)
            beat.maybe(self.clock, force=True)  # the last counts, as an augmenter process sends them
        finally:
            for sock in (jobs, ready):
                sock.close(linger=0)

    def augment(self, job: wire.Message) -> dict:
        """Decode one job; leave its images in `decoded`; return the 'ready' fields."""
        blob, offsets, labels, indices = job.arrays
        epoch, split, generation = job["epoch"], job["split"], job["generation"]
        if generation != self._generation:  # a new loader: what the old one made is stale
            self._generation = generation
            for key in list(self.decoded):  # list(): one step under the GIL, the copier pops meanwhile
                if key[0] != generation:
                    self.decoded.pop(key, None)  # in place: the copier holds this dict
        train = split == "train"
        side = CROP if train else IMAGE
        n = len(indices)
        draws = train_draws(self.seed, epoch, indices) if train else None
        tops = draws.crops[:, 0] if train else np.zeros(n, np.int16)
        lefts = draws.crops[:, 1] if train else np.zeros(n, np.int16)
        flips = draws.flips if train else np.zeros(n, np.uint8)
        samples = [blob[offsets[i]:offsets[i + 1]] for i in range(n)]
        # (route, detail): ("square", None), ("window", (width, height)), ("host", reason)
        # or ("skip", SkipSample).
        routes = [self._route(data) for data in samples]
        images: dict[int, torch.Tensor] = {}
        whole = None  # the batch as DALI made it, when one pipeline decoded every sample
        for kind in ("square", "window"):
            rows = [i for i in range(n) if routes[i][0] == kind]
            if not rows:
                continue
            blobs = [samples[i] for i in rows]
            try:
                if kind == "square":
                    out = self.decoder.decode(blobs, tops[rows], lefts[rows], flips[rows], side)
                else:
                    width, height = (np.array([routes[i][1][k] for i in rows]) for k in (0, 1))
                    out = self.decoder.decode_full(blobs, width, height, tops[rows], lefts[rows], flips[rows], side)
            except Exception:
                for i in rows:  # DALI refused: the host finds out why
                    routes[i] = ("host", "dali_error")
                continue
            images.update(zip(rows, out))
            self.paths["dali_decoded"] += len(rows)
            if len(rows) == n:
                whole = out
        skipped = []
        for i in range(n):
            route, detail = routes[i]
            if route == "host":
                route, detail = self._host_decode(samples[i], int(tops[i]), int(lefts[i]), bool(flips[i]), side,
                                                  images, i, detail)
            if route == "skip":
                self.clock.skip(detail.reason)
                skipped.append([int(indices[i]), detail.reason])
        kept = np.asarray([i for i in range(n) if i in images], np.int64)
        if whole is not None:
            batch = whole  # the usual case: nothing to assemble
        elif len(kept):
            batch = torch.stack([images[i] for i in kept])
        else:
            batch = torch.empty((0, side, side, 3), dtype=torch.uint8, device=self.device)
        self.decoded[(generation, epoch, job["seq"])] = batch
        self.clock.images += len(kept)
        arrays = [np.ascontiguousarray(labels[kept]), np.ascontiguousarray(indices[kept])]
        if train:
            arrays += [draws.crops[kept], draws.flips[kept], draws.alphas[kept]]
        return dict(arrays=arrays, epoch=epoch, seq=job["seq"], slot=job["slot"], split=split, n=len(kept),
                    generation=generation, skipped=skipped)

    def _route(self, data) -> tuple:
        """Where a stream is decoded: DALI's square pipeline (a 256x256 colour JPEG), its
        window pipeline (a colour JPEG of any other size), the host (with the reason),
        or nowhere (a header that fails: skipped)."""
        if len(data) < 4 or bytes(data[:2]) != b"\xff\xd8":
            return "host", "not_jpeg"  # empty, PNG named .JPEG, ...: the host decoder says what it is
        try:
            width, height, colorspace = self.host._header(data)
        except SkipSample as exc:
            return "skip", exc
        from turbojpeg import TJCS_CMYK, TJCS_YCCK

        if colorspace in (TJCS_CMYK, TJCS_YCCK):
            return "host", "cmyk"
        if bytes(data[-2:]) != _EOI:
            return "host", "no_eoi"  # most likely truncated: the host decoder tells
        if (width, height) == (IMAGE, IMAGE):
            return "square", None
        return "window", (width, height)

    def _host_decode(self, data, top: int, left: int, flipped: bool, side: int, images: dict, i: int,
                     reason: str) -> tuple:
        whole = np.empty((IMAGE, IMAGE, 3), np.uint8)
        try:
            self.host.decode_into(data, whole)
        except SkipSample as exc:
            return "skip", exc
        patch = whole[top:top + side, left:left + side]
        if flipped:
            patch = patch[:, ::-1]
        images[i] = torch.from_numpy(np.ascontiguousarray(patch)).to(self.device)
        fallback = self.paths["host_fallback"]
        fallback[reason] = fallback.get(reason, 0) + 1
        return "done", None
