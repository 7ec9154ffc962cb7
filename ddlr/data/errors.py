"""The exception raised for invalid data inputs."""


class DataError(ValueError):
  """Invalid dataset name, path, file, config field or noise setting.

  The message names the offending value and what was expected.
  """
