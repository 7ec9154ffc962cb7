"""SIGTERM handled as Ctrl-C, so that a job scheduler's stop leaves a resumable run.

Job schedulers stop a job with SIGTERM, whose default action ends Python at
once, without the `KeyboardInterrupt` handling of SIGINT: no message saying
where a rerun resumes, and a checkpoint write could be cut short.
`sigterm_as_interrupt` makes SIGTERM raise `Terminated`, a `KeyboardInterrupt`,
so both signals take the same path.
"""

import contextlib
import os
import signal
import sys
import threading
from typing import NoReturn

from absl import logging


class Terminated(KeyboardInterrupt):
  """Raised in the main thread on SIGTERM inside `sigterm_as_interrupt`."""


def _raise_terminated(signum, frame) -> None:
  del signum, frame
  raise Terminated


@contextlib.contextmanager
def sigterm_as_interrupt():
  """Makes SIGTERM raise `Terminated` inside the block, then restores the previous handler.

  Only the main thread can set signal handlers, so elsewhere the block runs
  unchanged. It also runs unchanged where SIGTERM already has a handler or is
  ignored.
  """
  if (
    threading.current_thread() is not threading.main_thread()
    or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
  ):
    yield
    return
  previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)


def raises_interrupt(signum: int) -> bool:
  """Returns whether the handler of signal `signum` raises a KeyboardInterrupt."""
  handler = signal.getsignal(signum)
  return handler is signal.default_int_handler or handler is _raise_terminated


def interrupt_for(signum: int) -> KeyboardInterrupt:
  """Returns the exception that signal `signum` raises: `Terminated` for SIGTERM."""
  return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def exit_status(interrupt: KeyboardInterrupt) -> int:
  """Returns the status a shell reports for a program ended by the signal behind `interrupt`.

  That is 128 plus the signal number: 143 for SIGTERM, 130 for SIGINT.
  """
  signum = signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT
  return 128 + signum


def exit_after_interrupt(interrupt: KeyboardInterrupt) -> NoReturn:
  """Ends the process at once with `exit_status(interrupt)`, after flushing output and logs.

  Call it only once every file the program writes is closed. An interrupt can
  stop the program while XLA or TensorFlow threads are still compiling or
  reading data, and the interpreter's shutdown then crashed with a
  segmentation fault (status 139) in some runs on a CPU (jax 0.10.2,
  tensorflow 2.21). `os._exit` skips that shutdown.
  """
  sys.stdout.flush()
  sys.stderr.flush()
  logging.flush()
  os._exit(exit_status(interrupt))


def restore_default_actions() -> None:
  """Gives SIGINT and SIGTERM their default actions, unless they are ignored.

  Called once a program's outputs are complete. A signal that arrives later,
  while the interpreter shuts down, then ends the process at once with the
  signal's status. Without this a SIGINT raised KeyboardInterrupt inside jax's exit
  handler, which Python prints as a traceback and ignores, so the status was 0.
  """
  for signum in (signal.SIGINT, signal.SIGTERM):
    # An ignored signal stays ignored, as the parent process set it.
    if raises_interrupt(signum):
      signal.signal(signum, signal.SIG_DFL)
