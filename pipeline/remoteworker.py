"""The remote host's end of pipeline/remote.py's protocol: `alexnetd augment`.

`alexnetd augment --connect HOST:PORT --key FILE --workers N` on a CPU host: N
processes, each one DEALER connection to the daemon's gateway (CURVE client: the key
file holds this host's keypair and the daemon's public key), decode the jobs they are
sent with the local augmenters' code (augment.decode_batch) into their own buffer and
send the pixels back. The gateway re-derives everything but the pixels, so a worker can
neither relabel a sample nor write another slot.
"""

from __future__ import annotations

import socket
import sys
import time

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from alexnetd.pipeline import wire
from alexnetd.pipeline.augment import decode_batch
from alexnetd.pipeline.jpeg import Decoder
from alexnetd.pipeline.remote import HANDSHAKE_FAILED, HOST_TIMEOUT, POLL_MS, PREFETCH, remote_endpoint
from alexnetd.pipeline.ring import IMAGE
from alexnetd.pipeline.stage import BEAT_SECONDS, StageClock, StopFlag, adopt_children, spawn_context, stop_processes

__all__ = ["run_remote", "RemoteRefused", "EXIT_REFUSED"]

EXIT_REFUSED = 2      # a worker process's exit code when the daemon will not have its key


class RemoteRefused(Exception):
    """The daemon refused this worker, or never answered; the message is one line."""


def run_remote(connect: str, key, workers: int = 1, connect_timeout: float = 30.0) -> int:
    """`alexnetd augment`: N worker processes (one runs in this process when N is 1).
    Returns the exit code; raises RemoteRefused with a one-line reason."""
    cfg = dict(connect=connect, name=key.name, public=key.public, secret=key.secret, server=key.server_public,
               workers=workers, connect_timeout=connect_timeout)
    if workers == 1:
        return _worker_loop(dict(cfg, index=0))
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
        stop_processes(procs, deadline=time.monotonic() + 5.0)


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
