"""`alexnetd keys` (who may join as a remote augmenter) and `alexnetd augment` (join)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from alexnetd.service.paths import default_run_dir


def _run_dir(run_dir) -> Path:
    return Path(run_dir).expanduser() if run_dir else default_run_dir()


@click.group("keys")
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help=f"The daemon's run directory [$ALEXNETD_RUN_DIR or {default_run_dir()}].")
@click.pass_context
def keys(ctx, run_dir):
    """CURVE keys of the hosts allowed to join as remote augmenters."""
    ctx.obj = _run_dir(run_dir)


@keys.command("add")
@click.argument("name")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Where to write the key file [./NAME.key].")
@click.pass_obj
def keys_add(run_dir, name, out):
    """Allow a new host; write its key file (give it to `alexnetd augment --key`)."""
    from alexnetd.service.keys import KeyFileError, add_client

    if not run_dir.is_dir():
        raise click.ClickException(f"run directory {run_dir} does not exist; start the daemon once, or pass --run-dir")
    try:
        path = add_client(run_dir, name, Path(out) if out else Path(f"{name}.key"))
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {path} (mode 0600; it holds a secret key: copy it to the augmenter host, then delete it here)")


@keys.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON array.")
@click.pass_obj
def keys_list(run_dir, as_json):
    """Allowed and revoked hosts."""
    from alexnetd.service.keys import list_clients

    rows = list_clients(run_dir)
    if as_json:
        click.echo(json.dumps(rows))
        return
    if not rows:
        click.echo(f"no remote augmenter keys in {run_dir}; add one with `alexnetd keys add NAME`")
    for row in rows:
        click.echo(f"{row['name']:<24} {row['state']:<8} added {row['added']}  {row['public_key']}")


@keys.command("revoke")
@click.argument("name")
@click.pass_obj
def keys_revoke(run_dir, name):
    """Refuse a host from now on; its open connections are dropped within seconds."""
    from alexnetd.service.keys import KeyFileError, revoke_client

    try:
        revoke_client(run_dir, name)
    except KeyFileError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"revoked {name}")


@click.command("augment")
@click.option("--connect", required=True, metavar="HOST:PORT", help="The daemon's --remote-augmenters address.")
@click.option("--key", "key_file", required=True, type=click.Path(dir_okay=False),
              help="Key file from `alexnetd keys add NAME` on the daemon's host.")
@click.option("--workers", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Decoding processes (one per core to spare).")
@click.option("--connect-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for the daemon's first answer.")
def augment(connect, key_file, workers, connect_timeout):
    """Decode batches for a daemon on another host (run this on a CPU host)."""
    from alexnetd.pipeline.netaddr import AddressError, parse_addr
    from alexnetd.pipeline.remoteworker import RemoteRefused, run_remote
    from alexnetd.service.keys import KeyFileError, read_client_key

    try:
        parse_addr(connect, "--connect")
        key = read_client_key(key_file)
    except (AddressError, KeyFileError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        code = run_remote(connect, key, workers, connect_timeout)
    except RemoteRefused as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)
