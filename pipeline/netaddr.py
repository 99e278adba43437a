"""HOST:PORT addresses, read and checked one way everywhere.

Used by the config (metrics, rendezvous, remote augmenters), `start`'s preflight, the
node group and the remote-augmenter transport: an IPv6 host is written in brackets
(`[::1]:9464`), as in a URL.
"""

from __future__ import annotations

import socket

__all__ = ["AddressError", "parse_addr", "format_addr", "bind_socket", "probe_bind", "free_port"]


class AddressError(ValueError):
    """Not HOST:PORT; the message is one line naming what the address was for."""


def parse_addr(addr: str, what: str = "address") -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port)."""
    host, sep, port = str(addr).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AddressError(f"{what} {addr!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def format_addr(host: str, port: int) -> str:
    """The inverse of parse_addr: brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) and to that address only; OSError if it cannot
    be had. SO_REUSEADDR as the metrics server, ZeroMQ and the c10d store all set it: a
    port in TIME_WAIT is free."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def probe_bind(host: str, port: int) -> None:
    """Raise OSError unless a listener could bind (host, port) now (preflight checks)."""
    bind_socket(host, port).close()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel says is free on `host` now (it may be taken again before use)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
