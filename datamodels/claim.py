"""One driver per run, on every kind of storage: a claim object with a heartbeat.

The claim is ``RUN/claim/zarr.json`` (shaped as a Zarr group whose attributes say who holds
the run, so Zarr tools list it like any node). A driver claims a run before it changes
anything in it: it reads the claim, refuses when another live driver holds it, writes its own,
waits a moment and reads it back (two drivers racing for a free run: the later write wins and
the other one backs off). While it works, a thread renews the heartbeat; before every write
the driver checks that the claim is still its own.

A claim left by a driver that was killed stops counting when

- its heartbeat is older than its ``ttl`` (seconds, stated in the claim), or
- it was made on this machine (same boot id) by a process that no longer exists,

or at once with ``takeover=True`` (``--takeover`` on the command line).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid

from datamodels.errors import StoreError
from datamodels.storage import Location

__all__ = ["DriverClaim", "CLAIM_KEY", "read_claim"]

log = logging.getLogger(__name__)
CLAIM_KEY = "claim/zarr.json"
DEFAULT_TTL = 120.0


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_claim(loc: Location) -> dict | None:
    """The claim held on ``loc`` (its attributes), or None."""
    raw = loc.read_bytes(CLAIM_KEY)
    if raw is None:
        return None
    try:
        return json.loads(raw)["attributes"]["claim"]
    except (ValueError, KeyError, TypeError):
        return {"owner": "?", "unreadable": True, "heartbeat": 0.0, "ttl": 0.0}


def _describe(c: dict) -> str:
    age = time.time() - float(c.get("heartbeat", 0))
    return (f"pid {c.get('pid', '?')} on {c.get('host', '?')} ({c.get('command', '?')}; "
            f"last heartbeat {age:.0f} s ago)")


class DriverClaim:
    """Exclusive claim of a run by this driver (a context manager)."""

    def __init__(self, loc: Location, *, takeover: bool = False, ttl: float = DEFAULT_TTL,
                 command: str | None = None):
        self.loc = loc
        self.takeover = takeover
        self.ttl = float(ttl)
        self.owner = uuid.uuid4().hex
        self.command = command or " ".join(os.path.basename(a) if i == 0 else a
                                           for i, a in enumerate(sys.argv[:4]))
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created_dir = False

    # ------------------------------------------------------------------ rules
    def stale(self, c: dict) -> bool:
        if c.get("unreadable"):
            return True
        if time.time() - float(c.get("heartbeat", 0)) > float(c.get("ttl", DEFAULT_TTL)):
            return True
        return c.get("boot_id") == _boot_id() and not _pid_alive(int(c.get("pid", -1)))

    def _doc(self) -> bytes:
        now = time.time()
        claim = {"owner": self.owner, "host": socket.gethostname(), "boot_id": _boot_id(), "pid": os.getpid(),
                 "command": self.command, "heartbeat": now, "ttl": self.ttl}
        return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {"claim": claim}}).encode()

    # ------------------------------------------------------------------ protocol
    def acquire(self) -> "DriverClaim":
        cur = read_claim(self.loc)
        if cur is not None and cur.get("owner") != self.owner:
            if self.takeover:
                log.warning("%s: taking over the claim of %s", self.loc, _describe(cur))
            elif not self.stale(cur):
                raise StoreError(
                    f"{self.loc} is being written by {_describe(cur)}; wait for it to finish, or if that "
                    f"driver is gone, re-run with --takeover")
            else:
                log.info("%s: the claim of %s has expired; claiming the run", self.loc, _describe(cur))
        self._created_dir = self.loc.local and not self.loc.exists()
        try:
            self.loc.write_bytes(CLAIM_KEY, self._doc())
        except Exception:
            self._remove_created_dir()
            raise
        time.sleep(0.1 if self.loc.local else 0.5)  # let a racing driver's write land, then look again
        back = read_claim(self.loc)
        if back is None or back.get("owner") != self.owner:
            raise StoreError(f"{self.loc} was claimed at the same moment by "
                             f"{_describe(back) if back else 'another driver'}; wait for it to finish")
        self._thread = threading.Thread(target=self._heartbeat, name="datamodels-claim", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        every = max(1.0, min(30.0, self.ttl / 4))
        while not self._stop.wait(every):
            try:
                cur = read_claim(self.loc)
                if cur is None or cur.get("owner") != self.owner:
                    self.lost = cur or {"owner": None}
                    log.error("%s: this driver's claim was taken over by %s", self.loc,
                              _describe(cur) if cur else "nobody (it was deleted)")
                    return
                self.loc.write_bytes(CLAIM_KEY, self._doc())
            except Exception as e:  # a storage hiccup: try again on the next beat
                log.warning("%s: could not renew the claim (%s)", self.loc, e)

    def check(self) -> None:
        """Raise StoreError when another driver has taken the run over (call before writing)."""
        if self.lost is not None:
            who = _describe(self.lost) if self.lost.get("owner") else "nobody (the claim was deleted)"
            raise StoreError(f"{self.loc}: this driver's claim was taken over by {who}; stopped without "
                             "writing more")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            cur = read_claim(self.loc)
            if cur is not None and cur.get("owner") == self.owner:
                self.loc.delete("claim", recursive=True)
                self._remove_created_dir()
        except Exception as e:
            log.warning("%s: could not release the claim (%s); it expires after %.0f s", self.loc, e, self.ttl)

    def _remove_created_dir(self) -> None:
        """Remove the run's directory if this driver made it and nothing but empty folders is in it."""
        if not self._created_dir:
            return
        root = self.loc.path
        try:
            for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                d.rmdir()
            root.rmdir()
        except OSError:
            pass  # something was written (or cannot be removed): keep it

    def __enter__(self) -> "DriverClaim":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
