"""The one exception type that entry points turn into a one-line message and a non-zero exit."""


class UserError(Exception):
  """Bad input from the user (config, corpus, checkpoint, workdir): reported without a traceback."""
