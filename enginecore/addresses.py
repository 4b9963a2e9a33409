"""Where an engine core listens: one user-facing address, two sockets.

    tcp://HOST:PORT  ->  inputs on tcp://HOST:PORT,   outputs on tcp://HOST:PORT+1
    ipc:///path      ->  inputs on ipc:///path,       outputs on ipc:///path.out

Both the engine core and the clients derive the pair from the one address with this module.
"""

from __future__ import annotations

import ipaddress

_LOOPBACK_NAMES = ("localhost", "ip6-localhost")


def socket_addresses(address: str) -> tuple[str, str]:
    """(input address, output address) of an engine core listening on `address`."""
    if address.startswith("ipc://"):
        return address, address + ".out"
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://") :].rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a tcp address needs HOST:PORT, got {address!r}")
        return address, f"tcp://{host}:{int(port) + 1}"
    raise ValueError(f"engine address must start with ipc:// or tcp://, got {address!r}")


def is_loopback(address: str) -> bool:
    """True for ipc:// addresses and tcp:// addresses on a loopback interface."""
    if address.startswith("ipc://"):
        return True
    host = address[len("tcp://") :].rpartition(":")[0].strip("[]")
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name, or "*": may resolve beyond loopback
