"""Reads the config object a Drover job ships with its tasks, in one call.

A job's ``runtime_env.config`` (any YAML or JSON object) reaches each of its tasks as
a JSON file whose path is in the ``DROVER_CONFIG`` variable::

    import drover_config
    settings = drover_config.load()
    print(settings["greeting"])

Standard library only; copy this file next to your program or ship it in the job's
working_dir.
"""

import json
import os

ENV_VAR = "DROVER_CONFIG"

_MISSING = object()


class ConfigError(Exception):
    """The job's config could not be read; the message says why."""


def load(default=_MISSING):
    """Returns the job's config as Python objects (dicts, lists, str, int, float...).

    Without a config (the variable is not set) it returns ``default`` when one is
    given, and raises ConfigError otherwise.
    """
    path = os.environ.get(ENV_VAR)
    if path is None:
        if default is not _MISSING:
            return default
        raise ConfigError(
            ENV_VAR + " is not set: this program is not running as a Drover task, "
            "or its job has no runtime_env.config"
        )
    return load_from(path)


def load_from(path):
    """Reads a config file at ``path``; for tests of a task's program, say."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError("reading the job's config %s: %s" % (path, e)) from e
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError("the job's config %s is not valid JSON: %s" % (path, e)) from e
