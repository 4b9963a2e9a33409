"""How a child process of ember notices that its parent is gone and stops by itself.

The parent keeps the write end of the child's stdin pipe open and never writes; when the parent
exits, is killed, or closes it on shutdown, the child reads EOF. As a second line (a parent that
forked keeps the pipe open in its fork), the child also stops once it is re-parented.
"""

from __future__ import annotations

import ctypes
import os
import select
import sys
import threading
from collections.abc import Callable

_POLL_S = 1.0
_PR_SET_NAME = 15


def set_process_name(name: str) -> None:
    """Show `name` in `ps -o comm` / `top` (Linux keeps 15 characters)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def watch_parent(on_parent_gone: Callable[[], None]) -> threading.Thread:
    """Call `on_parent_gone` once, from a daemon thread, when the parent is gone."""
    parent_pid = os.getppid()
    stdin_fd = sys.stdin.fileno()

    def wait() -> None:
        try:
            while os.getppid() == parent_pid:
                readable, _, _ = select.select([stdin_fd], [], [], _POLL_S)
                if readable and not os.read(stdin_fd, 4096):
                    break
        except OSError:
            pass
        on_parent_gone()

    thread = threading.Thread(target=wait, name="parent-watch", daemon=True)
    thread.start()
    return thread
