"""Setting a bare GPU host up for bench/gpu.py, and what every row shares.

Imports nothing of alexnetd at module level: it runs before alexnetd can be imported.

    python bench/gpuhost.py split WHEEL DIR [--part-mib 55]   # a big wheel in carryable parts

A wheel too big for one transfer to the GPU host (DALI's is ~200 MB, a call carries
64 MiB) travels as parts over consecutive calls: `split` writes NAME.part-K-of-N files
and NAME.parts.json (the parts, the whole wheel's size and sha256). On the host,
`set_up_from_wheels` joins the parts that arrived, checks the size and sha256, and only
then installs; parts missing (a fresh machine between calls loses what earlier calls
left) make the rows that need that wheel say "not carried" and which parts are missing.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pipeline/jpeg.py's TURBOJPEG_LIB_ENV; spelled out because it must be set before
# alexnetd (and PyTurboJPEG) can be imported at all.
TURBOJPEG_LIB_ENV = "ALEXNETD_TURBOJPEG_LIB"
# What set_up_from_wheels could not install ({distribution: why}), for the rows that
# need it; in the environment because the set-up starts the interpreter again.
NOT_CARRIED_ENV = "ALEXNETD_BENCH_NOT_CARRIED"
PART_MIB = 50  # a part, the checkout and the small wheels together within one call's 64 MiB

# Dense bf16 tensor-core peak (vendor datasheets), by a substring of the device name.
# First match wins: more specific names first. --peak-tflops overrides.
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.4), ("H200", 989.4), ("H100", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("L4", 121.0),
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ok(row: dict) -> dict:
    return {"status": "ok", **row}


def skipped(reason: str) -> dict:
    return {"status": "skipped", "reason": reason}


def datasheet_peak(name: str) -> float | None:
    """The dense bf16 FLOP/s of a device, by name, or None where the table lacks it."""
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def not_carried(distribution: str) -> str | None:
    """Why `distribution` was not installed from the wheels directory, or None."""
    return json.loads(os.environ.get(NOT_CARRIED_ENV) or "{}").get(distribution)


# -- a big wheel in parts --------------------------------------------------------------


def split_wheel(wheel: Path, into: Path, part_mib: int = PART_MIB) -> list[Path]:
    """Write `wheel` as NAME.part-K-of-N files of at most `part_mib` MiB, and
    NAME.parts.json; returns the parts (one per call that carries them)."""
    into.mkdir(parents=True, exist_ok=True)
    data = wheel.read_bytes()
    size = part_mib << 20
    count = -(-len(data) // size)
    parts = []
    for k in range(count):
        part = into / f"{wheel.name}.part-{k + 1}-of-{count}"
        part.write_bytes(data[k * size:(k + 1) * size])
        parts.append(part)
    manifest = {"wheel": wheel.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                "parts": [p.name for p in parts]}
    (into / f"{wheel.name}.parts.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return parts


def wheel_folders(wheels: Path) -> list[Path]:
    """`wheels` and its sub-folders: each call carries a folder of its own."""
    return [wheels, *sorted(p for p in wheels.iterdir() if p.is_dir())]


def join_parts(wheels: Path) -> dict[str, str]:
    """Join every split wheel in `wheels` whose parts all arrived (size and sha256
    checked); {distribution: why not} for the others. Parts may lie in different
    sub-folders (one per call); the wheel is written beside its parts.json."""
    missing = {}
    found = {p.name: p for folder in wheel_folders(wheels) for p in folder.iterdir() if p.is_file()}
    for listing in sorted(p for p in found.values() if p.name.endswith(".parts.json")):
        manifest = json.loads(listing.read_text())
        wheel = listing.parent / manifest["wheel"]
        distribution = manifest["wheel"].split("-")[0].replace("_", "-")
        if wheel.is_file() and wheel.stat().st_size == manifest["bytes"]:
            continue  # joined by an earlier call on this machine
        absent = [name for name in manifest["parts"] if name not in found]
        if absent:
            missing[distribution] = (f"not carried: {len(absent)} of the {len(manifest['parts'])} parts of "
                                     f"{manifest['wheel']} are not on this machine ({', '.join(absent)}); each "
                                     "call must reach the machine still warm from the one before")
            continue
        digest, partial = hashlib.sha256(), listing.parent / f".{wheel.name}.partial"
        with open(partial, "wb") as out:
            for name in manifest["parts"]:
                chunk = found[name].read_bytes()
                digest.update(chunk)
                out.write(chunk)
        if partial.stat().st_size != manifest["bytes"] or digest.hexdigest() != manifest["sha256"]:
            partial.unlink()
            missing[distribution] = f"not carried: the parts of {manifest['wheel']} do not join to its sha256"
            continue
        partial.replace(wheel)
        log(f"joined {wheel.name} from {len(manifest['parts'])} parts (sha256 checked)")
    return missing


# -- setting the host up ----------------------------------------------------------------


def imports_cleanly(extra: str = "") -> str | None:
    """None when alexnetd and what it needs import in a fresh interpreter, else why not."""
    code = "import zmq, turbojpeg, alexnetd.service.cli; from alexnetd.pipeline.jpeg import Decoder; Decoder()" + extra
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else f"exit code {done.returncode}"


def set_up_from_wheels(wheels: Path) -> None:
    """Install this checkout from a directory of wheels, without an index, DALI too when
    its wheel (whole or in parts) is there; use the TurboJPEG library shipped there.
    Exits with one line when alexnetd itself cannot be installed."""
    if not wheels.is_dir():
        sys.exit(f"bench/gpu.py: --wheels {wheels}: no such directory")
    folders = wheel_folders(wheels)
    libs = sorted(p for folder in folders for p in glob.glob(str(folder / "libturbojpeg.so*")))
    if libs:
        # Children (the daemon, its augmenters) inherit it.
        os.environ[TURBOJPEG_LIB_ENV] = str(Path(libs[0]).resolve())
        log(f"TurboJPEG library: {os.environ[TURBOJPEG_LIB_ENV]}")
    missing = join_parts(wheels)
    dali = [p for folder in folders for p in glob.glob(str(folder / "nvidia_dali_*.whl"))]
    if not dali and "nvidia-dali-cuda130" not in missing:
        missing["nvidia-dali-cuda130"] = f"not carried: no nvidia_dali wheel (or its parts) in {wheels}"
    os.environ[NOT_CARRIED_ENV] = json.dumps(missing)
    for why in missing.values():
        log(why)
    want_dali = bool(dali) and imports_cleanly("; import nvidia.dali") is not None
    if imports_cleanly() is None and not want_dali:
        log("alexnetd already imports here; nothing to install")
        return
    # Without an index, the build backend (setuptools, wheel) comes from DIR too; pytest,
    # for the gpu-tests row, when DIR has it; DALI and its needs through the dali extra.
    extra = ["pytest"] if any(glob.glob(str(folder / "pytest-*.whl")) for folder in folders) else []
    target = f"{ROOT}[dali]" if dali else str(ROOT)
    links = [arg for folder in folders for arg in ("--find-links", str(folder))]
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", *links, "-e", target, *extra]
    if _pip(command, fatal=not dali) != 0:
        # DALI's needs incomplete: alexnetd without it, its rows saying why.
        missing["nvidia-dali-cuda130"] = "not carried: DALI's wheel arrived but did not install (a needed wheel missing?)"
        os.environ[NOT_CARRIED_ENV] = json.dumps(missing)
        command[command.index(target)] = str(ROOT)
        _pip(command, fatal=True)
    why = imports_cleanly()
    if why is not None:
        sys.exit(f"bench/gpu.py: installed from {wheels}, but alexnetd still does not import: {why}")
    # An editable install is found through a .pth file read at interpreter start: start
    # again (the environment, with the library path, carries over; the install is done).
    log("installed; starting again")
    os.execv(sys.executable, [sys.executable, *sys.argv])


def _pip(command: list[str], fatal: bool = False) -> int:
    log(f"$ {shlex.join(command)}")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 and "externally-managed-environment" in done.stderr:
        # A distribution's Python on a throwaway GPU host: install beside its packages.
        done = subprocess.run(command + ["--break-system-packages"], capture_output=True, text=True)
    if done.returncode != 0:
        last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["(no output)"]
        if fatal:
            sys.exit(f"bench/gpu.py: installing from the wheels directory failed: {last[0].strip()}")
        log(f"pip failed: {last[0].strip()}")
    return done.returncode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Split a wheel into parts that fit one call's carry.")
    sub = ap.add_subparsers(dest="verb", required=True)
    split = sub.add_parser("split", help="WHEEL -> DIR/NAME.part-K-of-N + DIR/NAME.parts.json")
    split.add_argument("wheel", type=Path)
    split.add_argument("into", type=Path)
    split.add_argument("--part-mib", type=int, default=PART_MIB)
    args = ap.parse_args(argv)
    if not args.wheel.is_file():
        ap.error(f"{args.wheel}: no such file")
    for part in split_wheel(args.wheel, args.into, args.part_mib):
        print(part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
