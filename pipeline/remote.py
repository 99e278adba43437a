"""Remote augmenters: CPU hosts that decode batches for the trainer's host, over TCP.

Two ends of one protocol: the gateway in this file, the worker in pipeline/remoteworker.py
(which takes the shared constants from here).

gateway (`run_gateway`): one process per rank on the trainer's host, started with the
    input side when the daemon runs with `--remote-augmenters HOST:PORT`. To the loader
    and the copier it is one more augmenter: it PULLs jobs from the same endpoint and
    sends the same 'ready'. Each job goes to a connected remote worker (ZeroMQ ROUTER,
    CURVE server); the pixels that come back are written into the job's ring slot, and
    the gateway itself computes the per-sample draws from (seed, epoch, sample index),
    so a batch never depends on who decoded it. A worker that dies or goes silent for
    `host_timeout` seconds costs only the jobs it holds: they go to another worker, or
    the gateway decodes them itself when no worker is connected, so training neither
    stalls nor loses a batch, and a batch is handed on once (the first result for an
    assignment wins; late ones from a worker it was taken from are dropped).

remote worker (`remoteworker.run_remote`): `alexnetd augment --connect HOST:PORT --key FILE
    --workers N` on a CPU host. N processes, each one DEALER connection, decode with
    the local augmenters' code (augment.decode_batch) into their own buffer and send
    the pixels back.

Messages (all pipeline/wire.py frames; the ROUTER adds a routing frame in front):

    worker  -> gateway  beat    {prefetch, host, worker, workers}   on connect, then every second
    gateway -> worker   beat    {revoked?}                          answers each beat
    gateway -> worker   job     the loader's job: [jpeg bytes, offsets, labels, indices], the
                                bytes inline even where the loader left them in shared memory
    worker  -> gateway  pixels  {epoch, seq, generation, skipped}: [kept positions int64,
                                uint8 (n, 256, 256, 3)]

What crosses the network: a batch's raw JPEG bytes, labels and sample indices out;
decoded uint8 pixels back (about 25 MB per batch of 128). CURVE encrypts both ways and
authenticates both ends: the worker knows the daemon's public key from its key file,
and the gateway admits only public keys in RUN_DIR/remote/clients/ (pyzmq's zmq.auth
authenticator, asking pipeline/curvekeys.py). The key's name becomes the host's name in
status and metrics.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from alexnetd.pipeline import wire
from alexnetd.pipeline.augment import decode_batch, ready_fields
from alexnetd.pipeline.curvekeys import AllowedKeys, server_keypair
from alexnetd.pipeline.jobbytes import JobBytesReader
from alexnetd.pipeline.jobloop import job_sockets, send_ready, take_job
from alexnetd.pipeline.jpeg import REASONS, Decoder
from alexnetd.pipeline.netaddr import format_addr, parse_addr
from alexnetd.pipeline.ring import IMAGE, Ring
from alexnetd.pipeline.stage import Heartbeat, StageClock, StopFlag

__all__ = ["run_gateway", "remote_endpoint", "HOST_TIMEOUT", "PREFETCH", "POLL_MS", "HANDSHAKE_FAILED"]

log = logging.getLogger("alexnetd.remote")

HOST_TIMEOUT = 10.0   # seconds without a message before a worker's jobs are re-issued
PREFETCH = 2          # jobs a worker holds: one decoding, one on the wire
MAX_PREFETCH = 8      # what a worker may ask for: each held job is a ring slot
POLL_MS = 100
RATE_WINDOW = 10.0    # seconds over which a host's images/s is computed
ZAP_DOMAIN = "alexnetd"
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL


def remote_endpoint(addr: str, rank: int = 0) -> tuple[str, bool]:
    """'HOST:PORT' -> (ZeroMQ tcp endpoint, is IPv6). Rank r listens on PORT + r."""
    host, port = parse_addr(addr, "remote augmenter address")
    return f"tcp://{format_addr(host, port + rank)}", ":" in host


# ---------------------------------------------------------------------- the gateway

@dataclass
class _Worker:
    ident: bytes
    host: str          # the name of the key it authenticated with
    address: str
    prefetch: int
    last_seen: float   # monotonic
    jobs: dict = field(default_factory=dict)   # (epoch, seq) -> job Message it holds


@dataclass
class _Host:
    images: int = 0
    batches: int = 0
    last_seen: float = 0.0                      # unix time
    recent: deque = field(default_factory=deque)  # (monotonic, images) of recent results


def run_gateway(cfg: dict) -> None:
    """Process entry point. `cfg` keys: endpoints, ring, slots, batch, seed, index, rank,
    remote: {addr, keys_dir, host_timeout}."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    stop = StopFlag()
    gateway = _Gateway(cfg)
    try:
        gateway.run(stop)
    finally:
        gateway.close()


class _Gateway:
    def __init__(self, cfg: dict):
        remote = cfg["remote"]
        self.keys_dir = remote["keys_dir"]
        self.host_timeout = float(remote.get("host_timeout") or HOST_TIMEOUT)
        self.seed = cfg["seed"]
        self.ring = Ring(cfg["ring"], cfg["slots"], cfg["batch"])
        # A job's bytes may be in its slot's segment: read in place, they are sent on to
        # a host from there (valid until the slot's credit returns, after our 'ready').
        self.job_bytes = JobBytesReader(cfg["ring"], cfg["slots"])
        self.decoder = Decoder(fast=True)
        ends = cfg["endpoints"]
        self.ctx = zmq.Context()
        # The authenticator first: a CURVE socket bound before a ZAP handler exists would
        # admit anyone holding the server's public key.
        self.allowed = AllowedKeys(self.keys_dir)
        self.auth = ThreadAuthenticator(self.ctx)
        self.auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self.allowed)
        self.auth.start()
        self.jobs, self.ready = job_sockets(self.ctx, ends)  # as an augmenter: one job at a time
        public, secret = server_keypair(self.keys_dir)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone peer is an error, not a silent drop
        self.router.curve_server = True
        self.router.curve_publickey, self.router.curve_secretkey = public, secret
        self.router.zap_domain = ZAP_DOMAIN.encode()
        # ZMTP heartbeats close a connection whose peer vanished without a FIN.
        self.router.setsockopt(zmq.HEARTBEAT_IVL, 2000)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
        self.monitor = self.router.get_monitor_socket(HANDSHAKE_FAILED)
        self.endpoint, ipv6 = remote_endpoint(remote["addr"], cfg.get("rank", 0) - remote.get("first_rank", 0))
        self.router.ipv6 = ipv6
        self._bind()
        self.clock = StageClock()
        self.beat = Heartbeat(self.ctx, ends.get("beats"), "augmenter", index=cfg.get("index", 0),
                              rank=cfg.get("rank", 0))
        self.workers: dict[bytes, _Worker] = {}
        self.hosts: dict[str, _Host] = {}
        self.pending: list[wire.Message] = []    # jobs taken from the loader, not yet assigned
        self.refused = self.reissued = self.local_batches = 0
        log.info("listening for remote augmenters on %s", self.endpoint)

    def _bind(self) -> None:
        # The previous generation's gateway may still be letting the port go.
        deadline = time.monotonic() + 10.0
        while True:
            try:
                self.router.bind(self.endpoint)
                return
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise SystemExit(f"cannot listen for remote augmenters on {self.endpoint}: {exc}") from None
                time.sleep(0.2)

    def close(self) -> None:
        self.beat.maybe(self.clock, force=True, remote=self.summary())
        self.auth.stop()  # its thread polls a socket of this context: end it before the context
        self.ctx.destroy(linger=0)
        self.job_bytes.close()
        self.ring.close()

    # -- the loop ------------------------------------------------------------------

    def run(self, stop: StopFlag) -> None:
        poller = zmq.Poller()
        for sock in (self.router, self.monitor):
            poller.register(sock, zmq.POLLIN)
        while not stop.stopping:
            # Take a job from the loader only when a worker can start it at once (or
            # none is connected and it is decoded here): a job waiting in the gateway
            # is one the local augmenters could have done, and a batch the trainer
            # may wait for, in seq order, while later ones hold ring slots.
            room = not self.workers or any(len(w.jobs) < w.prefetch for w in self.workers.values())
            poller.register(self.jobs, zmq.POLLIN if room and not self.pending else 0)
            state = "busy" if self.pending or any(w.jobs for w in self.workers.values()) else "starved"
            with self.clock.timing(state):
                events = dict(poller.poll(POLL_MS))
            if self.monitor in events:
                self._count_refused()
            if self.router in events:
                self._from_workers()
            if self.jobs in events:
                self._take_jobs()
            self._expire()
            self._assign()
            if self.pending and not self.workers:
                # Nobody to hand it to: decode it here, as a local augmenter would.
                with self.clock.timing("busy"):
                    self._decode_here(self.pending.pop(0))
            if self.beat.due():
                self.beat.maybe(self.clock, remote=self.summary())

    def _take_jobs(self) -> None:
        job = take_job(self.jobs, self.clock, zmq.NOBLOCK, self.job_bytes)
        if job is not None:
            self.pending.append(job)

    def _assign(self) -> None:
        while self.pending:
            free = [w for w in self.workers.values() if len(w.jobs) < w.prefetch]
            if not free:
                return
            worker = max(free, key=lambda w: w.prefetch - len(w.jobs))
            job = self.pending[0]
            fields = {k: v for k, v in job.header.items() if k not in ("v", "kind")}
            try:
                self.router.send_multipart([worker.ident] + wire.encode("job", job.arrays, **fields),
                                           flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                worker.prefetch = len(worker.jobs)  # its pipe is full: wait for its results
                continue
            except zmq.ZMQError:  # EHOSTUNREACH: the connection is gone
                self._drop(worker, "its connection closed")
                continue
            self.pending.pop(0)
            worker.jobs[(job["epoch"], job["seq"])] = job

    def _decode_here(self, job: wire.Message) -> None:
        kept, skipped = decode_batch(job, self.ring.view(job["slot"]), self.decoder, self.clock)
        self._send_ready(job, kept, skipped)
        self.local_batches += 1

    def _send_ready(self, job: wire.Message, kept: np.ndarray, skipped: list) -> None:
        send_ready(self.ready, self.clock, ready_fields(job, kept, skipped, self.seed))

    # -- workers -------------------------------------------------------------------

    def _from_workers(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) < 2:
                self.clock.malformed += 1
                continue
            ident = frames[0].bytes
            try:
                msg = wire.decode(frames[1:])
            except wire.WireError:
                self.clock.malformed += 1
                continue
            # The authenticator's verdict rides on every frame: zmq.auth makes the key
            # itself (Z85) the User-Id, and clients/ names it; a revoked key has no name.
            host = self.allowed.name_of(frames[1].get("User-Id"))
            worker = self.workers.get(ident)
            if host is None:
                # Revoked since it connected: drop it, and tell it why.
                if worker is not None:
                    self._drop(worker, "its key was revoked")
                self._send(ident, "beat", revoked=True)
                continue
            if worker is None:
                if msg.kind != "beat":
                    continue  # a result meant for a gateway before this one
                worker = _Worker(ident, host, frames[1].get("Peer-Address"), PREFETCH, time.monotonic())
                self.workers[ident] = worker
                log.info("remote augmenter %s (%s) joined", host, worker.address)
            worker.last_seen = time.monotonic()
            self.hosts.setdefault(host, _Host()).last_seen = time.time()
            if msg.kind == "beat":
                prefetch = msg.get("prefetch", PREFETCH)
                worker.prefetch = max(1, min(MAX_PREFETCH, prefetch)) if isinstance(prefetch, int) else PREFETCH
                self._send(ident, "beat")
            elif msg.kind == "pixels":
                self._on_pixels(worker, msg)

    def _on_pixels(self, worker: _Worker, msg: wire.Message) -> None:
        try:
            key = (int(msg["epoch"]), int(msg["seq"]))
        except (KeyError, TypeError, ValueError):
            self.clock.malformed += 1
            return
        job = worker.jobs.get(key)
        if job is None or msg.get("generation") != job["generation"]:
            return  # taken from it already (it was silent too long), or of an older loader
        del worker.jobs[key]
        checked = _check_pixels(job, msg)
        if checked is None:
            # A worker that sends what it was not asked for does not get to write a slot.
            self.clock.malformed += 1
            log.warning("remote augmenter %s sent a malformed result for seq %d; decoding it here",
                        worker.host, key[1])
            self._decode_here(job)
            return
        kept, pixels, skipped = checked
        np.copyto(self.ring.view(job["slot"], len(kept)), pixels)
        for _index, reason in skipped:
            self.clock.skip(reason)
        self.clock.images += len(kept)
        self._send_ready(job, kept, skipped)
        stats = self.hosts.setdefault(worker.host, _Host())
        stats.images += len(kept)
        stats.batches += 1
        stats.recent.append((time.monotonic(), len(kept)))

    def _send(self, ident: bytes, kind: str, **fields) -> None:
        try:
            self.router.send_multipart([ident] + wire.encode(kind, **fields), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # gone or full: its next beat, or its silence, settles it

    def _expire(self) -> None:
        now = time.monotonic()
        for worker in [w for w in self.workers.values() if now - w.last_seen > self.host_timeout]:
            self._drop(worker, f"silent for {now - worker.last_seen:.0f} s")

    def _drop(self, worker: _Worker, why: str) -> None:
        """Forget a worker; its jobs go back to the front of the queue, oldest first."""
        self.workers.pop(worker.ident, None)
        if worker.jobs:
            self.reissued += len(worker.jobs)
            self.pending = sorted(self.pending + list(worker.jobs.values()), key=lambda j: (j["epoch"], j["seq"]))
        log.warning("remote augmenter %s (%s) dropped, %s; %d batch(es) re-issued",
                    worker.host, worker.address, why, len(worker.jobs))
        worker.jobs = {}

    # -- security --------------------------------------------------------------------
    # Who may connect is zmq.auth's (self.auth, asking self.allowed); what is left here is
    # counting the connections it refused, which libzmq reports on the monitor socket.

    def _count_refused(self) -> None:
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)
            if event["event"] & HANDSHAKE_FAILED:
                self.refused += 1
                log.warning("refused a remote augmenter connection (%s)",
                            "key not allowed" if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
                            else "handshake failed: wrong server key or not an alexnetd client")

    # -- status ----------------------------------------------------------------------

    def summary(self) -> dict:
        now = time.monotonic()
        connected: dict[str, list] = {}
        for worker in self.workers.values():
            connected.setdefault(worker.host, []).append(worker)
        hosts = []
        for name, stats in sorted(self.hosts.items()):
            while stats.recent and now - stats.recent[0][0] > RATE_WINDOW:
                stats.recent.popleft()
            if name not in connected:
                continue
            hosts.append({"host": name, "address": connected[name][0].address, "workers": len(connected[name]),
                          "images_per_second": round(sum(n for _, n in stats.recent) / RATE_WINDOW, 1),
                          "images": stats.images, "batches": stats.batches,
                          "in_flight": sum(len(w.jobs) for w in connected[name]), "last_seen": stats.last_seen})
        return {"endpoint": self.endpoint, "hosts": hosts, "images": {n: h.images for n, h in self.hosts.items()},
                "refused": self.refused, "reissued": self.reissued, "local_batches": self.local_batches}


def _check_pixels(job: wire.Message, msg: wire.Message):
    """(kept positions, pixels, skipped [[index, reason]]) of a well-formed result, else None.

    Everything but the pixels is re-derived from the job the gateway holds: a worker
    cannot relabel a sample or move a batch to another slot."""
    if len(msg.arrays) != 2:
        return None
    kept, pixels = msg.arrays
    indices = job.arrays[3]
    n = len(indices)
    if kept.dtype != np.int64 or kept.ndim != 1 or pixels.dtype != np.uint8 or \
            pixels.shape != (len(kept), IMAGE, IMAGE, 3):
        return None
    if len(kept) and (kept[0] < 0 or kept[-1] >= n or np.any(np.diff(kept) <= 0)):
        return None
    reasons = {}
    for entry in msg.get("skipped") or []:
        if isinstance(entry, list) and len(entry) == 2 and entry[1] in REASONS and isinstance(entry[0], int):
            reasons[entry[0]] = entry[1]
    dropped = np.setdiff1d(np.arange(n), kept)
    skipped = [[int(indices[p]), reasons.get(int(indices[p]), "undecodable")] for p in dropped]
    return kept, pixels, skipped
