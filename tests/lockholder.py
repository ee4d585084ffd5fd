"""Another process that holds a writer lock: the second writer of the lock tests.

`with holding(folder) as holder:` starts it and returns once it holds the lock; holder.release() (or the end
of the block) lets it release and exit; holder.kill() SIGKILLs it. With `copy_from`, it copies that folder's files
into the locked folder before it releases (a first writer finishing its set).
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import shutil, sys
from pathlib import Path
from stores.locks import writer_lock
folder, copy_from = Path(sys.argv[1]), sys.argv[2]
with writer_lock(folder, "the test's set"):
    print("locked", flush=True)
    sys.stdin.readline()
    if copy_from:
        for f in Path(copy_from).iterdir():
            if f.name != ".lock":
                shutil.copy2(f, folder / f.name)
"""


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


class Holder:
    def __init__(self, folder: Path, copy_from: Path | None = None):
        self.process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), str(copy_from or "")], env=env(),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        assert line.strip() == "locked", f"the holder did not take the lock: {line!r}"
        self.pid = self.process.pid
        self.releasing = False

    def release(self) -> None:
        self.releasing = True
        if self.process.poll() is None:
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            assert self.process.wait(timeout=30) == 0

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=30)


@contextmanager
def holding(folder: Path, copy_from: Path | None = None):
    holder = Holder(folder, copy_from)
    try:
        yield holder
    finally:
        if holder.releasing:
            holder.process.wait(timeout=30)
        else:
            holder.release()


TRY = """
import sys
from stores.errors import UserError
from stores.locks import writer_lock
try:
    writer_lock(sys.argv[1], "the test's set").acquire()
except UserError:
    sys.exit(3)
"""


def another_process_can_lock(folder: Path) -> bool:
    """Whether a fresh process gets the lock at once (it releases it by exiting)."""
    code = subprocess.run([sys.executable, "-c", TRY, str(folder)], env=env(), timeout=60).returncode
    assert code in (0, 3), code
    return code == 0
