"""`alexnetd keys`: add, revoke and list the CURVE keys of remote augmenter hosts, and
read a host's key file for `alexnetd augment`.

The files' layout and format (RUN_DIR/remote/: server.key, clients/NAME.pub,
revoked/NAME.pub; zmq.auth certificates) are pipeline/curvekeys.py's, which the gateway
reads the same way: `add` and `revoke` take effect without restarting the daemon.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import zmq

from alexnetd.pipeline.curvekeys import (KeyFileError, certificate, keys_dir, private_dir, read_fields,
                                        server_keypair, write_private, z85_key)

__all__ = ["KeyFileError", "ClientKey", "keys_dir", "server_keypair", "add_client", "revoke_client", "list_clients",
           "read_client_key", "NAME_PATTERN"]

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ClientKey:
    def __init__(self, name: str, public: bytes, secret: bytes, server_public: bytes):
        self.name, self.public, self.secret, self.server_public = name, public, secret, server_public


def _check_name(name: str) -> None:
    if not NAME_PATTERN.match(name):
        raise KeyFileError(f"{name!r} is not a key name: use letters, digits, '.', '_' or '-' (64 at most)")


def add_client(run_dir, name: str, out: Path) -> Path:
    """Allow a new client host; write its key file to `out` (never overwritten)."""
    _check_name(name)
    server_public, _ = server_keypair(run_dir)
    clients = private_dir(keys_dir(run_dir) / "clients")
    if (clients / f"{name}.pub").exists():
        raise KeyFileError(f"a key named {name!r} exists already; revoke it first or choose another name")
    out = Path(out)
    if out.exists():
        raise KeyFileError(f"{out} exists; not overwriting it")
    public, secret = zmq.curve_keypair()
    try:
        write_private(out, certificate(f"alexnetd remote augmenter key {name!r}: holds a secret key, keep it private",
                                       {"name": name}, {"public-key": public, "secret-key": secret,
                                                        "server-public-key": server_public}))
    except OSError as exc:
        raise KeyFileError(f"cannot write {out}: {exc.strerror}") from None
    revoked = keys_dir(run_dir) / "revoked" / f"{name}.pub"
    revoked.unlink(missing_ok=True)  # the name is reused with a fresh key
    write_private(clients / f"{name}.pub",
                  certificate(f"allowed remote augmenter {name!r}", {"name": name}, {"public-key": public}))
    return out


def revoke_client(run_dir, name: str) -> None:
    _check_name(name)
    path = keys_dir(run_dir) / "clients" / f"{name}.pub"
    if not path.exists():
        raise KeyFileError(f"no key named {name!r} in {keys_dir(run_dir) / 'clients'}")
    revoked = private_dir(keys_dir(run_dir) / "revoked")
    os.replace(path, revoked / f"{name}.pub")


def list_clients(run_dir) -> list[dict]:
    """[{name, public_key, state: allowed|revoked, added}] sorted by name."""
    rows = []
    for state, folder in (("allowed", "clients"), ("revoked", "revoked")):
        for path in sorted((keys_dir(run_dir) / folder).glob("*.pub")):
            rows.append({"name": path.stem, "public_key": read_fields(path).get("public-key", ""), "state": state,
                         "added": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(path.stat().st_mtime))})
    return sorted(rows, key=lambda r: (r["name"], r["state"]))


def read_client_key(path) -> ClientKey:
    path = Path(path)
    try:
        fields = read_fields(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path} is not an alexnetd key file") from None
    missing = [k for k in ("public-key", "secret-key", "server-public-key") if k not in fields]
    if missing:
        raise KeyFileError(f"{path} is not an alexnetd client key file (no {', '.join(missing)}); "
                           "make one with `alexnetd keys add NAME` on the daemon's host")
    return ClientKey(fields.get("name", path.stem), z85_key(fields["public-key"], "public-key", path),
                     z85_key(fields["secret-key"], "secret-key", path),
                     z85_key(fields["server-public-key"], "server-public-key", path))
