"""The decoder seam: where JPEG bytes become pixels, chosen once with `--decoder`.

Each decoder is one class that says everything the rest of the daemon needs of it:
- `stages(...)`: the processes it spawns for one rank's input side (beside the loader);
- `in_trainer(...)`: what it runs inside the trainer process (a thread), or None;
- `fills_ring`: whether its batches are pixels in the shared-memory ring (else the ring
  slots are only credits, and no pixel memory is reserved in /dev/shm);
- `default_slots()`: how many ring slots keep it busy;
- `host_of(stage)`: which process a stage's work lives in (for the process counts);
- `preflight(local_ranks)`: what `start` checks for it before anything is forked, and
  `start_lines()`: what the start message says of it;
- `retire(beat)` / `status(beats)` / `status_lines(status)`: its own rows of `status`
  and the metrics.
Nothing outside this module and the decoders' own files asks which decoder runs; a
third decoder is one more class here and one entry in DECODERS.

- `cpu` (default): augmenter processes decode with libjpeg-turbo into the ring
  (pipeline/augment.py). Remote augmenter hosts are a transport of this decoder: one
  more "augmenter" process, the gateway (pipeline/remote.py), takes jobs like the local
  ones and writes what the hosts decode into local ring slots.
- `dali`: no augmenter process; a thread of each trainer process decodes on the device
  with NVIDIA DALI (pipeline/dali.py) and hands the copier device batches. What DALI must
  not see is decoded on the host, image by image; its `status` rows count both paths.
"""

from __future__ import annotations

import os

from alexnetd.pipeline.augment import run_augmenter
from alexnetd.pipeline.curvekeys import KeyFileError, allowed_clients, server_keypair
from alexnetd.pipeline.netaddr import parse_addr, probe_bind
from alexnetd.pipeline.remote import run_gateway

__all__ = ["CpuDecoding", "DaliDecoding", "DECODERS", "make_decoding", "default_augmenters", "status_lines"]

REMOTE_SLOTS = 4  # two remote workers' prefetch (pipeline/remote.py); --slots for more


def default_augmenters(ranks: int = 1) -> int:
    """One augmenter per core, less one for the loader and trainer when there are many;
    with several data-parallel ranks on a host, each rank's input side gets its share."""
    cores = len(os.sched_getaffinity(0))
    total = max(1, cores - 1) if cores > 2 else cores
    return max(1, total // ranks)


class CpuDecoding:
    """Augmenter processes (and, with `remote`, a gateway to remote hosts) fill the ring."""

    name = "cpu"
    fills_ring = True

    def __init__(self, augmenters: int, remote: dict | None = None, max_pixels: int | None = None):
        # remote: {"addr": HOST:PORT, "keys_dir": RUN_DIR, "first_rank": R}; this node's
        # rank r listens on PORT + r, on every node.
        self.augmenters, self.remote, self.max_pixels = augmenters, remote or None, max_pixels
        self._retired = {"images": {}, "refused": 0, "reissued": 0}  # of gateways already replaced

    @classmethod
    def configure(cls, augmenters: int, remote: dict | None, max_pixels: int | None) -> "CpuDecoding":
        return cls(augmenters, remote, max_pixels)

    @staticmethod
    def missing() -> str | None:
        return None  # libjpeg-turbo is a dependency of the package

    def preflight(self, local_ranks: int) -> list[str]:
        """With remote hosts: the daemon's CURVE keypair exists (made now if not) and every
        rank's port is free. ValueError (one line) if not; notes for the user."""
        if not self.remote:
            return []
        try:
            server_keypair(self.remote["keys_dir"])
        except KeyFileError as exc:
            raise ValueError(str(exc)) from None
        host, port = parse_addr(self.remote["addr"], "remote_augmenters")
        for rank in range(local_ranks):
            try:
                probe_bind(host, port + rank)
            except OSError as exc:
                raise ValueError(f"cannot listen for remote augmenters on {host}:{port + rank}: {exc.strerror}") from None
        if allowed_clients(self.remote["keys_dir"]):
            return []
        return [f"note: no remote augmenter keys yet; add one with "
                f"`alexnetd keys --run-dir {self.remote['keys_dir']} add NAME`"]

    def start_lines(self) -> list[str]:
        if not self.remote:
            return []
        return [f"  remote   {self.remote['addr']}  (alexnetd augment --connect HOST:PORT --key FILE)"]

    def describe(self) -> str:
        return f"{self.augmenters} augmenter(s) per rank" + (", remote hosts at " + self.remote["addr"]
                                                             if self.remote else "")

    def default_slots(self) -> int:
        """A few slots per augmenter keep every augmenter busy while the trainer holds
        one; remote hosts get room for a few workers' prefetched jobs on top."""
        return max(3, 2 * self.augmenters + 2) + (REMOTE_SLOTS if self.remote else 0)

    def stages(self, common: dict, ring: str, rank: int) -> dict:
        """(stage, index) -> (entry point, config) of this decoder's processes of one rank.
        The gateway is numbered after the local augmenters: to the supervisor it is one
        more augmenter, watched and restarted like them."""
        out = {("augmenter", i): (run_augmenter, dict(common, ring=ring, index=i, max_pixels=self.max_pixels,
                                                      rank=rank))
               for i in range(self.augmenters)}
        if self.remote:
            out[("augmenter", self.augmenters)] = (run_gateway, dict(common, ring=ring, index=self.augmenters,
                                                                     rank=rank, remote=self.remote))
        return out

    def in_trainer(self, endpoints: dict, seed: int, batch: int, device, rank: int, ring):
        return None  # the augmenter processes write the ring; the copier reads it

    def host_of(self, stage: str) -> str:
        return "trainer" if stage == "copier" else stage

    # -- the remote hosts' rows of status and the metrics ------------------------------

    def retire(self, beat: dict) -> None:
        """Fold a replaced gateway's counters in, so they stay monotonic."""
        remote = beat.get("remote")
        if remote:
            _add_remote(self._retired, remote)

    def status(self, beats: dict) -> dict:
        """{"remote_augmenters": ...}: hosts connected to every rank's gateway, counters
        summed over gateways past and present (None without remote hosts)."""
        if not self.remote:
            return {"remote_augmenters": None}
        out = {"hosts": [], "images": dict(self._retired["images"]),
               "refused": self._retired["refused"], "reissued": self._retired["reissued"]}
        for name, beat in sorted(beats.items(), key=lambda item: str(item[0])):
            remote = beat.get("remote")
            if remote:
                out["hosts"] += [dict(h, rank=name.local) for h in remote["hosts"]]
                _add_remote(out, remote)
        return {"remote_augmenters": out}

    @staticmethod
    def status_lines(status: dict) -> list[str]:
        remote = status.get("remote_augmenters")
        if remote is None:
            return []
        hosts = ", ".join(f"{h['host']} ({h['workers']} workers, {h['images_per_second']:.1f} images/s)"
                          for h in remote["hosts"]) or "none connected"
        return [f"  remote      {hosts}; {remote['refused']} refused, {remote['reissued']} batches re-issued"]


class DaliDecoding:
    """NVIDIA DALI in a thread of each trainer process: no augmenter processes; the ring's
    slots only bound the work in flight (the loader still needs a credit per batch)."""

    name = "dali"
    fills_ring = False

    def __init__(self, threads: int, max_pixels: int | None = None):
        self.threads, self.max_pixels = threads, max_pixels
        self._retired = _no_paths()  # of decoding threads already replaced

    @classmethod
    def configure(cls, augmenters: int, remote: dict | None, max_pixels: int | None) -> "DaliDecoding":
        if remote:
            raise ValueError("remote augmenters decode for the cpu decoder; --decoder dali decodes in the trainer")
        return cls(augmenters, max_pixels)

    def describe(self) -> str:
        return "decoding with DALI in the trainer"

    def default_slots(self) -> int:
        return 4  # one batch decoding, one handed on, two in the loader's hands

    def stages(self, common: dict, ring: str, rank: int) -> dict:
        return {}

    def in_trainer(self, endpoints: dict, seed: int, batch: int, device, rank: int, ring):
        from alexnetd.pipeline.dali import DaliAugmenter  # torch and DALI: only in the trainer process
        from alexnetd.pipeline.jobbytes import JobBytesReader

        # It takes the loader's jobs too: their bytes lie in the segments of this rank's ring.
        return DaliAugmenter(endpoints, seed, batch, device, rank, self.max_pixels, self.threads,
                             job_bytes=JobBytesReader(ring.name, ring.slots))

    def host_of(self, stage: str) -> str:
        # The decoding thread reports as the augmenter stage, from the trainer process.
        return "trainer" if stage in ("copier", "augmenter") else stage

    def preflight(self, local_ranks: int) -> list[str]:
        return []

    def start_lines(self) -> list[str]:
        return []

    # -- which path decoded the images: rows of status and the metrics ----------------

    def retire(self, beat: dict) -> None:
        """Fold a replaced decoding thread's counts in, so they stay monotonic."""
        paths = beat.get("paths")
        if paths:
            _add_paths(self._retired, paths)

    def status(self, beats: dict) -> dict:
        """{"decoder": {"name", "dali_decoded", "host_fallback", "host_fallback_reasons"}}:
        images decoded on the device and on the host (by reason: FALLBACK_REASONS of
        pipeline/dali.py), summed over every rank's thread, past and present."""
        total = _no_paths()
        _add_paths(total, self._retired)
        for beat in beats.values():
            if beat.get("paths"):
                _add_paths(total, beat["paths"])
        reasons = dict(sorted(total["host_fallback"].items()))
        return {"remote_augmenters": None,
                "decoder": {"name": self.name, "dali_decoded": total["dali_decoded"],
                            "host_fallback": sum(reasons.values()), "host_fallback_reasons": reasons}}

    @staticmethod
    def status_lines(status: dict) -> list[str]:
        decoder = status.get("decoder")
        if not decoder or decoder.get("name") != "dali":
            return []
        reasons = ", ".join(f"{_FALLBACK_WORDS.get(reason, reason)} {count:,}"
                            for reason, count in decoder["host_fallback_reasons"].items())
        return [f"  decoder     dali: {decoder['dali_decoded']:,} images on the device, "
                f"{decoder['host_fallback']:,} on the host" + (f" ({reasons})" if reasons else "")]

    @staticmethod
    def missing() -> str | None:
        from alexnetd.pipeline.dali import dali_missing  # imports torch: only when asked

        return dali_missing()


# How status names the reasons an image went to the host instead of DALI.
_FALLBACK_WORDS = {"cmyk": "CMYK", "not_jpeg": "not JPEG", "no_eoi": "no end-of-image marker",
                   "dali_error": "DALI failed on the batch"}


def _no_paths() -> dict:
    return {"dali_decoded": 0, "host_fallback": {}}


def _add_paths(into: dict, paths: dict) -> None:
    into["dali_decoded"] += paths.get("dali_decoded", 0)
    for reason, count in (paths.get("host_fallback") or {}).items():
        into["host_fallback"][reason] = into["host_fallback"].get(reason, 0) + count


DECODERS = {"cpu": CpuDecoding, "dali": DaliDecoding}


def make_decoding(name: str, augmenters: int, remote: dict | None = None, max_pixels: int | None = None):
    """The decoder a run uses. `augmenters` is the per-rank count (processes for cpu,
    DALI's CPU threads for dali). ValueError (one line) for a combination it refuses."""
    return DECODERS[name].configure(augmenters, remote, max_pixels)


def status_lines(status: dict) -> list[str]:
    """The decoders' own lines of `alexnetd status`, from its JSON."""
    return [line for decoder in DECODERS.values() for line in decoder.status_lines(status)]


def _add_remote(into: dict, remote: dict) -> None:
    for host, images in remote["images"].items():
        into["images"][host] = into["images"].get(host, 0) + images
    into["refused"] += remote["refused"]
    into["reissued"] += remote["reissued"]
