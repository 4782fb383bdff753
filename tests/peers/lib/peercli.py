"""Shared bits of the peer tests' Python tools (framesizes.py, pinger.py, tcp.py): they import it
from their own directory, which Python puts first on the path of a script it runs."""
import signal


def take_option(args: list, name: str, default, convert=float):
    """Remove `name VALUE` from args and return convert(VALUE), or default if name is absent."""
    if name not in args:
        return default
    i = args.index(name)
    value = convert(args[i + 1])
    del args[i:i + 2]
    return value


class StopFlag:
    """Set by SIGTERM or SIGINT (installed on creation): `while not stop: ...`."""

    def __init__(self) -> None:
        self.set = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, _signum, _frame) -> None:
        self.set = True

    def __bool__(self) -> bool:
        return self.set
