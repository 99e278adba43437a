"""Remote augmenters: CPU hosts that decode batches for the trainer's host, over TCP.

Two ends of one protocol, in this file:

gateway (`run_gateway`): one process per rank on the trainer's host, started with the
    input side when the daemon runs with `--remote-augmenters HOST:PORT`. To the loader
    and the feed it is one more augmenter: it PULLs jobs from the same endpoint and
    sends the same 'ready'. Each job goes to a connected remote worker (ZeroMQ ROUTER,
    CURVE server); the pixels that come back are written into the job's ring slot, and
    the gateway itself computes the per-sample draws from (seed, epoch, sample index),
    so a batch never depends on who decoded it. A worker that dies or goes silent for
    `host_timeout` seconds costs only the jobs it holds: they go to another worker, or
    the gateway decodes them itself when no worker is connected, so training neither
    stalls nor loses a batch, and a batch is handed on once (the first result for an
    assignment wins; late ones from a worker it was taken from are dropped).

remote worker (`run_remote`): `alexnetd augment --connect HOST:PORT --key FILE
    --workers N` on a CPU host. N processes, each one DEALER connection, decode with
    the local augmenters' code (augment.decode_batch) into their own buffer and send
    the pixels back.

Messages (all pipeline/wire.py frames; the ROUTER adds a routing frame in front):

    worker  -> gateway  beat    {prefetch, host, worker, workers}   on connect, then every second
    gateway -> worker   beat    {revoked?}                          answers each beat
    gateway -> worker   job     the loader's job as it came: [jpeg bytes, offsets, labels, indices]
    worker  -> gateway  pixels  {epoch, seq, generation, skipped}: [kept positions int64,
                                uint8 (n, 256, 256, 3)]

What crosses the network: a batch's raw JPEG bytes, labels and sample indices out;
decoded uint8 pixels back (about 25 MB per batch of 128). CURVE encrypts both ways and
authenticates both ends: the worker knows the daemon's public key from its key file,
and the gateway's ZAP handler admits only public keys in RUN_DIR/remote/clients/
(service/keys.py). The key's name becomes the host's name in status and metrics.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from alexnetd.pipeline import wire
from alexnetd.pipeline.augment import decode_batch, ready_fields
from alexnetd.pipeline.jpeg import REASONS, Decoder
from alexnetd.pipeline.ring import IMAGE, Ring
from alexnetd.pipeline.stage import BEAT_SECONDS, Heartbeat, StageClock, StopFlag, adopt_children

__all__ = ["run_gateway", "run_remote", "remote_endpoint", "RemoteRefused", "HOST_TIMEOUT", "PREFETCH"]

log = logging.getLogger("alexnetd.remote")

HOST_TIMEOUT = 10.0   # seconds without a message before a worker's jobs are re-issued
PREFETCH = 2          # jobs a worker holds: one decoding, one on the wire
MAX_PREFETCH = 8      # what a worker may ask for: each held job is a ring slot
POLL_MS = 100
RATE_WINDOW = 10.0    # seconds over which a host's images/s is computed
ALLOW_RELOAD = 2.0    # seconds between re-reads of the allowed keys (revocation)
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
HANDSHAKE_FAILED = zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | \
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
EXIT_REFUSED = 2      # the worker's exit code when the daemon will not have its key


class RemoteRefused(Exception):
    """The daemon refused this worker, or never answered; the message is one line."""


def remote_endpoint(addr: str, rank: int = 0) -> tuple[str, bool]:
    """'HOST:PORT' -> (ZeroMQ tcp endpoint, is IPv6). Rank r listens on PORT + r."""
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    ipv6 = ":" in host
    return f"tcp://{'[' + host + ']' if ipv6 else host}:{int(port) + rank}", ipv6


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
        from alexnetd.service.keys import allowed_clients, server_keypair

        self._allowed_clients = allowed_clients
        remote = cfg["remote"]
        self.keys_dir = remote["keys_dir"]
        self.host_timeout = float(remote.get("host_timeout") or HOST_TIMEOUT)
        self.seed = cfg["seed"]
        self.ring = Ring(cfg["ring"], cfg["slots"], cfg["batch"])
        self.decoder = Decoder(fast=True)
        ends = cfg["endpoints"]
        self.ctx = zmq.Context()
        # ZAP first: a CURVE socket bound before the handler exists would admit anyone
        # holding the server's public key.
        self.zap = self.ctx.socket(zmq.REP)
        self.zap.setsockopt(zmq.LINGER, 0)
        self.zap.bind(ZAP_ENDPOINT)
        self.jobs = self.ctx.socket(zmq.PULL)
        self.jobs.setsockopt(zmq.RCVHWM, 1)  # as an augmenter: take a job only when it can start it
        self.jobs.setsockopt(zmq.LINGER, 0)
        self.jobs.connect(ends["jobs"])
        self.ready = self.ctx.socket(zmq.PUSH)
        self.ready.setsockopt(zmq.LINGER, 1000)
        self.ready.connect(ends["ready"])
        public, secret = server_keypair(self.keys_dir)
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone peer is an error, not a silent drop
        self.router.curve_server = True
        self.router.curve_publickey, self.router.curve_secretkey = public, secret
        self.router.zap_domain = b"alexnetd"
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
        self.allowed: dict[bytes, str] = {}
        self.allowed_at = 0.0
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
        self.ctx.destroy(linger=0)
        self.ring.close()

    # -- the loop ------------------------------------------------------------------

    def run(self, stop: StopFlag) -> None:
        poller = zmq.Poller()
        for sock in (self.router, self.zap, self.monitor):
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
            if self.zap in events:
                self._answer_zap()
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
        try:
            job = wire.recv(self.jobs, zmq.NOBLOCK)
        except zmq.Again:
            return
        except wire.WireError:
            self.clock.malformed += 1
            return
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
        out = ready_fields(job, kept, skipped, self.seed)
        with self.clock.timing("blocked"):
            wire.send(self.ready, "ready", out.pop("arrays"), **out)
        self.clock.batches += 1

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
            # The ZAP handler's verdict rides on every frame: the key's name.
            host = frames[1].get("User-Id")
            worker = self.workers.get(ident)
            if host not in self._allowed().values():
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

    def _allowed(self) -> dict[bytes, str]:
        if time.monotonic() - self.allowed_at > ALLOW_RELOAD:
            self.allowed, self.allowed_at = self._allowed_clients(self.keys_dir), time.monotonic()
        return self.allowed

    def _answer_zap(self) -> None:
        """ZeroMQ's authentication protocol (RFC 27): admit a CURVE key listed in clients/."""
        frames = self.zap.recv_multipart()
        if len(frames) < 6:
            return
        version, request_id, mechanism = frames[0], frames[1], frames[5]
        self.allowed_at = 0.0  # every handshake sees the current list
        name = self._allowed().get(frames[6]) if mechanism == b"CURVE" and len(frames) > 6 else None
        if name is None:
            # Counted through the monitor's handshake-failed event, with the other failures.
            self.zap.send_multipart([version, request_id, b"400", b"key not allowed", b"", b""])
        else:
            self.zap.send_multipart([version, request_id, b"200", b"OK", name.encode(), b""])

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


# ---------------------------------------------------------------------- the remote host

def run_remote(connect: str, key, workers: int = 1, connect_timeout: float = 30.0) -> int:
    """`alexnetd augment`: N worker processes (one runs in this process when N is 1).
    Returns the exit code; raises RemoteRefused with a one-line reason."""
    cfg = dict(connect=connect, name=key.name, public=key.public, secret=key.secret, server=key.server_public,
               workers=workers, connect_timeout=connect_timeout)
    if workers == 1:
        return _worker_loop(dict(cfg, index=0))
    from alexnetd.pipeline.launch import spawn_context

    adopt_children()
    procs = [spawn_context.Process(target=_worker_main, args=(dict(cfg, index=i),), name=f"alexnetd-remote-{i}")
             for i in range(workers)]
    stop = StopFlag()
    for proc in procs:
        proc.start()
    try:
        while not stop.stopping:
            codes = [p.exitcode for p in procs if p.exitcode is not None]
            if codes:
                # One refused means all are (one key): stop the others and say so.
                raise RemoteRefused(_refusal_line(cfg)) if EXIT_REFUSED in codes else SystemExit(max(codes))
            time.sleep(0.2)
        return 0
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def _worker_main(cfg: dict) -> None:
    """A child worker process: the same loop, its refusal as an exit code (printed by the parent)."""
    try:
        sys.exit(_worker_loop(cfg))
    except RemoteRefused:
        sys.exit(EXIT_REFUSED)


def _refusal_line(cfg: dict) -> str:
    return cfg.get("refusal") or (f"the daemon at {cfg['connect']} refused key {cfg['name']!r} "
                                  "(unknown or revoked; `alexnetd keys list` on the daemon's host)")


def _worker_loop(cfg: dict) -> int:
    stop = StopFlag()
    endpoint, ipv6 = remote_endpoint(cfg["connect"])
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.ipv6 = ipv6
    sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = cfg["server"], cfg["public"], cfg["secret"]
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)      # queue only on a live connection: no results for a dead daemon
    sock.setsockopt(zmq.SNDTIMEO, 2000)
    sock.setsockopt(zmq.RECONNECT_IVL, 500)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    monitor = sock.get_monitor_socket(HANDSHAKE_FAILED)
    sock.connect(endpoint)
    decoder, clock = Decoder(fast=True), StageClock()
    buffers: list = [None, None]
    trackers: list = [None, None]
    turn = 0
    started = last_heard = time.monotonic()
    last_beat, joined, lost = 0.0, False, False
    host = socket.gethostname()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    try:
        while not stop.stopping:
            now = time.monotonic()
            if now - last_beat >= BEAT_SECONDS * 2:
                try:
                    wire.send(sock, "beat", flags=zmq.NOBLOCK, prefetch=PREFETCH, host=host, worker=cfg["index"],
                              workers=cfg["workers"])
                except zmq.Again:
                    pass  # not connected yet
                last_beat = now
            if not joined and now - started > cfg["connect_timeout"]:
                raise RemoteRefused(f"no answer from {cfg['connect']} within {cfg['connect_timeout']:.0f} s: "
                                    "is the daemon running with --remote-augmenters there, and the port reachable?")
            if joined and not lost and now - last_heard > HOST_TIMEOUT:
                lost = True
                print(f"lost the daemon at {cfg['connect']}; reconnecting", file=sys.stderr, flush=True)
            events = dict(poller.poll(POLL_MS))
            if monitor in events:
                event = recv_monitor_message(monitor)
                if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise RemoteRefused(_refusal_line(cfg))
                if event["event"] & HANDSHAKE_FAILED:
                    raise RemoteRefused(f"{cfg['connect']} refused the handshake: the key file was made for another "
                                        "daemon (its server key does not match), or that is not an alexnetd daemon")
            if sock not in events:
                continue
            try:
                msg = wire.recv(sock, zmq.NOBLOCK)
            except zmq.Again:
                continue
            except wire.WireError:
                continue
            last_heard, lost = time.monotonic(), False
            if msg.kind == "beat":
                if msg.get("revoked"):
                    raise RemoteRefused(f"the daemon at {cfg['connect']} revoked key {cfg['name']!r}")
                if not joined:
                    joined = True
                    print(f"connected to {cfg['connect']} as {cfg['name']!r} (worker {cfg['index'] + 1} of "
                          f"{cfg['workers']})", file=sys.stderr, flush=True)
            elif msg.kind == "job":
                n = len(msg.arrays[3])
                # Two buffers in turn, so decoding the next job overlaps sending this
                # one; a buffer zmq still sends from is never written (copy=False).
                if buffers[turn] is None or len(buffers[turn]) < n or \
                        (trackers[turn] is not None and not trackers[turn].done):
                    buffers[turn] = np.empty((max(n, 1), IMAGE, IMAGE, 3), np.uint8)
                kept, skipped = decode_batch(msg, buffers[turn], decoder, clock)
                frames = wire.encode("pixels", [kept, buffers[turn][:len(kept)]], epoch=msg["epoch"],
                                     seq=msg["seq"], generation=msg["generation"], skipped=skipped)
                try:
                    trackers[turn] = sock.send_multipart(frames, copy=False, track=True)
                except zmq.Again:
                    pass  # the daemon went away: it re-issues this job elsewhere
                turn = 1 - turn
        return 0
    finally:
        ctx.destroy(linger=0)
