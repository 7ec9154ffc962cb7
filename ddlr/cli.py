"""Command-line handling shared by `ddlr.main` and the scripts in experiments/.

A bad flag, config file or config override, a positional argument, an empty
`--workdir` or list flag, and every error in `RUN_ERRORS` end the program with
one `error:` line on standard error and exit status 1 instead of a traceback or
a usage message.
"""

import importlib.util
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

from ddlr import checkpoint, interrupts, train
from ddlr.config_checks import ConfigError
from ddlr.data import SOURCES, DataError

FLAGS = flags.FLAGS

# Errors caused by the input (config, data, workdir) or by a diverging run,
# whose message names the problem, so no traceback is printed for them.
RUN_ERRORS = (
  ConfigError,
  DataError,
  checkpoint.ResumeError,
  train.NonFiniteLossError,
  OSError,
)


# Libraries that log every file operation at INFO.
_CHATTY_LIBRARIES = ("orbax", "tensorflow_datasets")


def hide_library_info_logs() -> None:
  """Drops the INFO logs of Orbax and tfds from absl's output; their warnings still show."""
  logging.get_absl_handler().addFilter(
    lambda record: (
      record.levelno > logging.converter.STANDARD_INFO
      or not any(name in record.pathname for name in _CHATTY_LIBRARIES)
    )
  )


def exit_with_error(error: Exception | str) -> NoReturn:
  """Prints `error: <message>` on standard error and exits with status 1."""
  message = " ".join(line.strip() for line in str(error).splitlines())
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def _override_base_config(argv: list[str]):
  """Returns the config that the `--config.<field>` overrides of `argv` apply to, or None.

  That is the file given by `--config=` (loaded here again, since the flag
  failed to parse), or else the config flag's default.
  """
  config_arg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if config_arg is None:
    default = FLAGS["config"].default if "config" in FLAGS else None
    return default if hasattr(default, "keys") else None
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("ddlr_config_file", path)
  if spec is None or spec.loader is None:
    return None
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config(arg or None)
  except Exception:  # noqa: BLE001 - the original parse error is reported instead
    return None


def _unknown_override(argv: list[str]) -> str | None:
  """Returns a message naming the first `--config.<field>` override the config lacks."""
  config = _override_base_config(argv)
  if config is None:
    return None
  for argument in argv:
    if not argument.startswith("--config."):
      continue
    field = argument.removeprefix("--config.").split("=", 1)[0]
    node = config
    for depth, part in enumerate(field.split(".")):
      if not hasattr(node, "keys") or part not in node:
        parent = ".".join(field.split(".")[:depth]) or "the config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none"
        return f"--config.{field}: {parent} has no field {part!r}; its fields are: {known}."
      node = node[part]
  return None


def define_config_flag(default: str, help_string: str) -> None:
  """Defines the `--config` flag with a default config file.

  Without `--config=` on the command line, config_flags loads `default` and
  applies the command line's `--config.<field>` overrides while the flag is
  defined, so an unknown field fails here, before `parse_flags`. That ends
  the program with one error line too.
  """
  try:
    config_flags.DEFINE_config_file("config", default, help_string)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    argv = [*sys.argv, f"--config={default}"]
    exit_with_error(_unknown_override(argv) or f"cannot load the config {default}: {error}")


def check_flag_values(flag_values: flags.FlagValues = FLAGS) -> None:
  """Ends the program with one error line for an empty `--workdir` or an empty list flag.

  A workdir of "" or blanks would put the runs in the current directory. A
  list flag given on the command line with no value, or with an empty entry
  (`--seeds=0,,1`), is rejected too, because an empty value is not the same
  as leaving the flag out, which selects its default.
  """
  workdir = flag_values["workdir"].value if "workdir" in flag_values else None
  if workdir is not None and not workdir.strip():
    exit_with_error("--workdir is empty; give the directory for the run's outputs.")
  for name in list(flag_values):
    flag = flag_values[name]
    # Skip the short-name aliases, which are listed beside the full names.
    if flag.name != name or not flag.present or not isinstance(flag.parser, flags.BaseListParser):
      continue
    message = empty_list_flag_message(name, flag.value, flag.default)
    if message is not None:
      exit_with_error(message)


def empty_list_flag_message(name: str, values: list[str], default: list[str] | None) -> str | None:
  """Returns the error for a list flag `--name` whose `values` are empty or have an empty entry.

  Returns None when every entry has text.
  """
  if default:
    fallback = f"leave the flag out for its default --{name}={','.join(default)}"
  else:
    fallback = "leave the flag out for its default"
  if not any(value.strip() for value in values):
    return f"--{name} is empty; give at least one value, or {fallback}."
  if not all(value.strip() for value in values):
    joined = ",".join(values)
    return (
      f"--{name}={joined} has an empty entry; separate the values with single commas, "
      f"e.g. --{name}={','.join(value for value in values if value.strip())}."
    )
  return None


# The flags of `define_data_flags`, each with the `config.data` field it sets.
DATA_FLAGS = {"data_source": "source", "data_dir": "data_dir", "manual_dir": "manual_dir"}


def define_data_flags() -> None:
  """Defines `--data_source`, `--data_dir` and `--manual_dir`, which locate every run's data.

  For the scripts that build their runs' configs themselves and so take no
  `--config.data.<field>` overrides. `data_location` reads them.
  """
  flags.DEFINE_string(
    "data_source",
    None,
    "Sets config.data.source of every run: tfds (a tfds dataset prepared in --data_dir) or "
    "idx (the raw files in --manual_dir: IDX files for (Fashion-)MNIST, the extracted python "
    "archive for CIFAR). The config's value (tfds) when left out.",
  )
  flags.DEFINE_string(
    "data_dir",
    None,
    "Sets config.data.data_dir of every run: the directory of the prepared tfds datasets. "
    "tfds' default ($TFDS_DATA_DIR, or ~/tensorflow_datasets) when left out.",
  )
  flags.DEFINE_string(
    "manual_dir",
    None,
    "Sets config.data.manual_dir of every run: the directory of the raw files, which "
    "--data_source=idx reads and from which tfds prepares fashion_mnist offline. The "
    "config's value when left out.",
  )


def data_location(flag_values: flags.FlagValues = FLAGS) -> dict[str, str]:
  """Returns {`config.data` field: value} for each data flag given on the command line.

  Raises:
    ValueError: naming the flag, for a source other than tfds and idx, an
      empty path or a path that is not a directory.
  """
  location = {}
  for name, field in DATA_FLAGS.items():
    if flag_values[name].value is not None:
      location[field] = flag_values[name].value
  source = location.get("source")
  if source is not None and source not in SOURCES:
    raise ValueError(
      f"--data_source={source!r} is invalid; expected tfds (a tfds dataset prepared in "
      "--data_dir) or idx (the raw files in --manual_dir)."
    )
  contents = {"data_dir": "the prepared tfds datasets", "manual_dir": "the raw dataset files"}
  for field, content in contents.items():
    path = location.get(field)
    if path is not None and not path.strip():
      raise ValueError(
        f"--{field} is empty; give the directory of {content}, or leave the flag out for "
        "the config's value."
      )
    if path is not None and not os.path.isdir(path):
      raise ValueError(
        f"--{field}={path} is not a directory; give an existing directory of {content}."
      )
  return location


def set_data_location(config, location: dict[str, str]) -> None:
  """Sets the `config.data` fields of `location` (from `data_location`) in `config`.

  Raises:
    ValueError: if `--data_source=idx` leaves the config without a manual_dir
      to read the raw files from.
  """
  for field, value in location.items():
    config.data[field] = value
  if location.get("source") == "idx" and config.data.manual_dir is None:
    raise ValueError(
      f"--data_source=idx reads the raw {config.data.name} files from --manual_dir, which is "
      "not given; add --manual_dir=DIR."
    )


def _with_data_flags_note(error: Exception) -> Exception | str:
  """Returns `error`, or its message with the data flags added if it names a data location."""
  if not isinstance(error, DataError) or "data_source" not in FLAGS:
    return error
  if not any(field in str(error) for field in DATA_FLAGS.values()):
    return error
  return (
    f"{error}; this command sets config.data.source, data_dir and manual_dir with "
    "--data_source, --data_dir and --manual_dir."
  )


def parse_flags(argv: list[str]) -> list[str]:
  """Parses the command line, turning a bad flag, config file or override into one error line.

  The programs take flags only, so a positional argument is an error too, and
  so are the empty values that `check_flag_values` rejects.
  """
  try:
    remaining = FLAGS(argv)
    if len(remaining) > 1:
      extra = ", ".join(repr(argument) for argument in remaining[1:])
      plural = "s" if len(remaining) > 2 else ""
      exit_with_error(
        f"unexpected positional argument{plural} {extra}; the program takes only flags "
        "(--name=value, see --help)."
      )
    check_flag_values()
    # The config file is loaded lazily; loading it here reports a missing or
    # broken file before any work starts.
    if "config" in FLAGS and FLAGS.config is not None:
      FLAGS.config.keys()
    return remaining
  except OSError as error:
    exit_with_error(error)
  except flags.Error as error:
    # A config file that raises is reported with its whole traceback; the
    # first line names the flag and the last one the exception. An unknown
    # override of a default config also lands here, as an unknown flag.
    lines = str(error).strip().splitlines()
    message = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"
    exit_with_error(_unknown_override(argv) or message)
  except (AttributeError, KeyError, TypeError, ValueError) as error:
    # config_flags applies --config.<field>=<value> while parsing, so an
    # unknown field or a value of the wrong type surfaces here.
    exit_with_error(_unknown_override(argv) or f"cannot load the config: {error}")


def run(main: Callable[[list[str]], None]) -> None:
  """Runs `main` as an absl program whose input and run errors print one `error:` line.

  The flags are parsed by `parse_flags`. Any exception in `RUN_ERRORS` that
  `main` raises ends the program with exit status 1; other exceptions keep
  their traceback, since they are bugs rather than bad input. Ctrl-C (SIGINT)
  and SIGTERM end it with one line saying that a rerun resumes, and exit status
  130 or 143 (`interrupts.exit_status`). The
  INFO logs of Orbax and tfds are hidden (`hide_library_info_logs`).
  """

  def main_with_error_line(argv: list[str]) -> None:
    hide_library_info_logs()
    try:
      with interrupts.sigterm_as_interrupt():
        main(argv)
    except RUN_ERRORS as error:
      exit_with_error(_with_data_flags_note(error))
    except KeyboardInterrupt as interrupt:
      print(
        "interrupted; rerunning the same command reuses the finished runs and resumes the "
        "others from their latest checkpoints.",
        file=sys.stderr,
      )
      # Each run's checkpoints and metric files are closed by now.
      interrupts.exit_after_interrupt(interrupt)
    interrupts.restore_default_actions()

  app.run(main_with_error_line, flags_parser=parse_flags)
