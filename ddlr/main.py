r"""Command-line entry point: trains and evaluates one experiment config.

  python -m ddlr.main --config=configs/default.py --workdir=runs/default \
    --config.train.num_epochs=4

Any config field can be overridden with `--config.<field>=<value>`. Errors in
the config, the data or the run's numerics end the program with one line on
standard error and exit status 1. Ctrl-C (SIGINT) and SIGTERM end it with the
step a rerun resumes from, and exit status 130 or 143.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from ddlr import cli, interrupts, reporting, train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (ml_collections).")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, rates and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def _resume_hint(workdir: str) -> str:
  """Returns what rerunning the command in `workdir` will do, from its checkpoint steps."""
  directory = os.path.join(workdir, "checkpoints")
  names = os.listdir(directory) if os.path.isdir(directory) else []
  saved = [int(name) for name in names if name.isdecimal()]
  if not saved:
    return "no checkpoint was written yet, so rerunning the command starts afresh."
  return f"rerunning the command resumes from the checkpoint at step {max(saved)} in {directory}."


def main(argv: list[str]) -> None:
  del argv  # cli.parse_flags has rejected positional arguments.
  # TensorFlow is only the input pipeline; it must not take the accelerator.
  import tensorflow as tf  # noqa: PLC0415

  tf.config.set_visible_devices([], "GPU")
  logging.set_verbosity(logging.INFO)
  cli.hide_library_info_logs()
  try:
    with interrupts.sigterm_as_interrupt():
      summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except cli.RUN_ERRORS as error:
    cli.exit_with_error(error)
  except KeyboardInterrupt as interrupt:
    print(f"interrupted; {_resume_hint(FLAGS.workdir)}", file=sys.stderr)
    # train_and_evaluate has closed its checkpoints and metric files by now.
    interrupts.exit_after_interrupt(interrupt)
  interrupts.restore_default_actions()
  if not summary["completed"]:
    print(
      f"stopped after step {summary['step']} of {summary['total_steps']} as "
      "config.train.stop_after_steps asks; "
      "rerun without it, or with a later step, to continue."
    )
    return
  for line in reporting.summary_lines(summary, FLAGS.config):
    print(line)
  print(f"outputs in {FLAGS.workdir}")


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
