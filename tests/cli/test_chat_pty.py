"""`maestrale chat` driven through a pseudo-terminal, as a person would use it, on the real default model."""

import os
import pty
import select
import signal
import sys
import time

import pytest

from maestrale.cli import default_model

pytestmark = pytest.mark.slow


class Terminal:
    """A child process on its own pseudo-terminal (so Ctrl-C reaches it); `expect` reads up to a marker."""

    def __init__(self, argv: list[str]):
        self.pid, self.master = pty.fork()
        if self.pid == 0:
            # As a shell leaves it for background jobs (CI): the chat must still answer Ctrl-C.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.execv(argv[0], argv)
        self.output = ""

    def expect(self, marker: str, timeout: float = 180) -> str:
        """Everything printed up to and including the next `marker`."""
        deadline = time.monotonic() + timeout
        while marker not in self.output:
            ready, _, _ = select.select([self.master], [], [], max(deadline - time.monotonic(), 0))
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout} s; the terminal shows:\n{self.output}")
            try:
                self.output += os.read(self.master, 4096).decode("utf-8", errors="replace")
            except OSError:  # the child has exited and closed the terminal
                raise AssertionError(f"the chat ended before {marker!r}; the terminal shows:\n{self.output}")
        seen, _, self.output = self.output.partition(marker)
        return seen

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        """The child's exit code."""
        try:
            return os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        finally:
            os.close(self.master)


def chat(*options: str) -> Terminal:
    default_model()  # a clear error rather than a hanging terminal when the fixture is missing
    term = Terminal([sys.executable, "-m", "maestrale", "chat", "--temperature", "0", *options])
    term.expect("/exit")  # the greeting names the commands
    term.expect("> ")
    return term


def reply(term: Terminal, line: str) -> str:
    """The model's answer to `line`, without the terminal's echo of it."""
    term.send(line + "\n")
    return term.expect("> ").split(line, 1)[1]


def test_chat_keeps_history_and_reset_forgets_it():
    term = chat("--max-new-tokens", "40")
    first = reply(term, "My name is Alice. Please remember it.")
    second = reply(term, "What is my name?")
    assert "history cleared" in reply(term, "/reset")
    after_reset = reply(term, "What is my name?")
    term.send("/exit\n")
    assert term.close() == 0
    # The name was given only in the first turn: the second answer can know it only from the history.
    assert "Alice" in first
    assert "Alice" in second
    assert "Alice" not in after_reset


def test_ctrl_c_stops_the_reply_and_the_chat_goes_on():
    term = chat("--max-new-tokens", "2000")
    term.send("Write a long story about a dragon.\n")
    term.expect("dragon.")
    term.expect(" ", timeout=60)  # the reply has begun
    term.send("\x03")
    assert "[stopped]" in term.expect("> ", timeout=60)
    assert "history cleared" in reply(term, "/reset")
    term.send("/exit\n")
    assert term.close() == 0
