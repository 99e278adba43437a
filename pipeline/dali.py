"""`--decoder dali`: JPEG decode with NVIDIA DALI inside the trainer process.

The other side of the decoder seam (the default is the CPU augmenter processes writing
the ring, pipeline/augment.py). Here no augmenter process runs: a thread of the trainer
process takes the loader's jobs (raw JPEG bytes) itself and has DALI decode each
training sample's random 224 crop straight on the device (`fn.decoders.image_crop`,
device="mixed": nvJPEG or the hardware JPEG decoder; so the JPEGs cross PCIe compressed),
then mirrors it (`fn.flip`). Validation images are decoded whole (crop 256x256). The
crop, flip and lighting draws are the same deterministic ones the augmenters send
(plan.train_draws), and the thread sends the copier the same "ready" message, so order,
labels, crops and everything after the decode are those of the CPU path.

On a machine without CUDA the same pipeline runs on DALI's CPU backend, which is how the
tests exercise it; there it uses libjpeg-turbo's accurate IDCT and fancy upsampling, so
its pixels equal `Decoder(fast=False)`'s bit for bit (tested). Against the CPU
augmenters' fast IDCT + fast upsampling they differ: see tests/test_dali.py for the bound.

Bad input never reaches DALI, because a DALI error invalidates the whole pipeline:
- on the host, every sample's header is read first (magic, pixel budget, colour space,
  size) and a stream without its end-of-image marker is treated as suspect; header
  failures are skipped and counted like the CPU path's;
- what DALI is not given (not a JPEG, CMYK, not 256x256, suspect) is decoded on the host
  by `Decoder`, cut and mirrored there and sent to the device: rare on prepared shards;
- if DALI still fails on a batch, the pipeline is rebuilt and that batch is decoded on
  the host, so a file DALI rejects costs one slower batch and is skipped and counted
  exactly as the CPU path would.
One difference remains, by choice: a stream damaged inside its entropy-coded data but
with all its markers is decoded by DALI as libjpeg-turbo does when its warning is
ignored (grey where data is missing), while the CPU path turns that warning into a
skip. Finding it on the host would mean decoding everything twice; and `prepare`, which
makes the shards this decoder is for, decodes every image and keeps only clean ones.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
import zmq

from alexnetd.pipeline import wire
from alexnetd.pipeline.jobloop import job_sockets, run_jobs
from alexnetd.pipeline.jpeg import DEFAULT_MAX_PIXELS, Decoder, SkipSample
from alexnetd.pipeline.plan import train_draws
from alexnetd.pipeline.ring import CROP, IMAGE
from alexnetd.pipeline.stage import Heartbeat, StageClock

__all__ = ["DaliDecoder", "DaliAugmenter", "dali_missing"]

_EOI = b"\xff\xd9"


def dali_missing() -> str | None:
    """Why DALI cannot be used here (one line), or None when it can."""
    try:
        import nvidia.dali  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install failing its own way
        return (f"--decoder dali needs NVIDIA DALI: pip install 'alexnetd[dali]' "
                f"(import nvidia.dali failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    return None


class DaliDecoder:
    """A DALI pipeline: encoded JPEGs + per-sample window and mirror -> uint8 NHWC on the device.

    Synchronous (exec_pipelined=False): one batch in, one batch out. The overlap with
    training comes from running in its own thread while the trainer steps, as every
    other stage overlaps; DALI's own prefetching would need inputs fed ahead of time."""

    def __init__(self, batch: int, device: torch.device, threads: int = 2):
        self.batch, self.device, self.threads = batch, torch.device(device), threads
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._build()

    def _build(self) -> None:
        from nvidia.dali import fn, pipeline_def, types

        cuda = self.device.type == "cuda"

        @pipeline_def(batch_size=self.batch, num_threads=self.threads,
                      device_id=(self.device.index or 0) if cuda else None,
                      exec_pipelined=False, exec_async=False, prefetch_queue_depth=1)
        def crops():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8)
            pos_x = fn.external_source(name="pos_x", dtype=types.FLOAT)
            pos_y = fn.external_source(name="pos_y", dtype=types.FLOAT)
            side = fn.external_source(name="side", dtype=types.FLOAT)
            mirror = fn.external_source(name="mirror", dtype=types.INT32)
            # use_fast_idct is the CPU backend's; False keeps libjpeg-turbo's accurate IDCT.
            extra = {} if cuda else {"use_fast_idct": False}
            images = fn.decoders.image_crop(jpegs, device="mixed" if cuda else "cpu", output_type=types.RGB,
                                            crop_w=side, crop_h=side, crop_pos_x=pos_x, crop_pos_y=pos_y, **extra)
            return fn.flip(images, horizontal=mirror)

        self.pipe = crops()
        self.pipe.build()

    def decode(self, blobs: list, tops: np.ndarray, lefts: np.ndarray, flips: np.ndarray, side: int) -> torch.Tensor:
        """(n, side, side, 3) uint8 on the device: each 256x256 JPEG's window at (top, left),
        mirrored where flipped. Raises whatever DALI raises, after rebuilding the pipeline."""
        n = len(blobs)
        # crop_pos is the window's anchor as a fraction of the room left: a position
        # in 0..32 over 32 is exact in binary, so DALI lands on the same pixel.
        room = max(IMAGE - side, 1)
        try:
            self.pipe.feed_input("jpegs", blobs)
            self.pipe.feed_input("pos_x", [np.float32(v / room) for v in lefts])
            self.pipe.feed_input("pos_y", [np.float32(v / room) for v in tops])
            self.pipe.feed_input("side", [np.float32(side)] * n)
            self.pipe.feed_input("mirror", [np.int32(v) for v in flips])
            (images,) = self.pipe.run()
        except Exception:
            self._build()  # a DALI error leaves the pipeline unusable
            raise
        return self._to_torch(images, (n, side, side, 3))

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
    flight (the loader still needs a credit per batch)."""

    def __init__(self, endpoints: dict, seed: int, batch: int, device, rank: int = 0,
                 max_pixels: int | None = None, threads: int = 2):
        self.ends, self.seed, self.rank = endpoints, seed, rank
        self.decoded: dict = {}
        self.decoder = DaliDecoder(batch, device, threads)
        self.host = Decoder(max_pixels=max_pixels or DEFAULT_MAX_PIXELS, fast=False)  # DALI's own IDCT
        self.clock = StageClock()
        self.device = self.decoder.device
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
        beat = Heartbeat(ctx, self.ends.get("beats"), "augmenter", index=0, rank=self.rank, in_trainer=True)
        try:
            run_jobs(jobs, ready, self.clock, beat, self.augment, self._stop.is_set)
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
        verdicts = [self._precheck(data) for data in samples]  # "dali", "host" or a SkipSample
        on_device = [i for i in range(n) if verdicts[i] == "dali"]
        images: dict[int, torch.Tensor] = {}
        decoded = None
        if on_device:
            try:
                decoded = self.decoder.decode([samples[i] for i in on_device], tops[on_device], lefts[on_device],
                                              flips[on_device], side)
                images.update(zip(on_device, decoded))
            except Exception:
                verdicts = ["host" if v == "dali" else v for v in verdicts]  # DALI refused: the host finds out why
                decoded = None
        skipped = []
        for i in range(n):
            if verdicts[i] == "host":
                verdicts[i] = self._host_decode(samples[i], int(tops[i]), int(lefts[i]), bool(flips[i]), side, images, i)
            if isinstance(verdicts[i], SkipSample):
                self.clock.skip(verdicts[i].reason)
                skipped.append([int(indices[i]), verdicts[i].reason])
        kept = np.asarray([i for i in range(n) if i in images], np.int64)
        if decoded is not None and len(on_device) == n:
            batch = decoded  # the usual case: DALI decoded every sample, nothing to assemble
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

    def _precheck(self, data):
        """Whether DALI may decode this stream: only well-formed 256x256 colour JPEGs."""
        if len(data) < 4 or bytes(data[:2]) != b"\xff\xd8":
            return "host"  # empty, PNG named .JPEG, ...: the host decoder says what it is
        try:
            width, height, colorspace = self.host._header(data)
        except SkipSample as exc:
            return exc
        from turbojpeg import TJCS_CMYK, TJCS_YCCK

        if colorspace in (TJCS_CMYK, TJCS_YCCK) or (width, height) != (IMAGE, IMAGE):
            return "host"
        if bytes(data[-2:]) != _EOI:
            return "host"  # most likely truncated: the host decoder tells
        return "dali"

    def _host_decode(self, data, top: int, left: int, flipped: bool, side: int, images: dict, i: int):
        whole = np.empty((IMAGE, IMAGE, 3), np.uint8)
        try:
            self.host.decode_into(data, whole)
        except SkipSample as exc:
            return exc
        patch = whole[top:top + side, left:left + side]
        if flipped:
            patch = patch[:, ::-1]
        images[i] = torch.from_numpy(np.ascontiguousarray(patch)).to(self.device)
        return "done"

