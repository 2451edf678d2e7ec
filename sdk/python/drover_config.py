"""Reads the config object a Drover job ships with its tasks, in one call.

A job's ``runtime_env.config`` (any YAML or JSON object) reaches each of its tasks as
a JSON file whose path is in the ``DROVER_CONFIG`` variable, and over the task socket
(``DROVER_SOCKET``) that the agent serves to each process task::

    import drover_config
    settings = drover_config.load()           # from the file
    settings = drover_config.from_socket()    # the same, asked of the agent
    print(settings["greeting"])

Standard library only; copy this file next to your program or ship it in the job's
working_dir.
"""

import json
import os

ENV_VAR = "DROVER_CONFIG"
SOCKET_VAR = "DROVER_SOCKET"

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


def from_socket(path=None, timeout=10.0):
    """Asks the agent for the job's config over the task socket.

    ``path`` defaults to ``DROVER_SOCKET``. Returns the config as Python objects, or
    None when the job has none.
    """
    return _ask(path, {"op": "config"}, timeout).get("config")


def task_info(path=None, timeout=10.0):
    """Asks the agent who this task is: its id, job, project, index and attempt."""
    reply = _ask(path, {"op": "info"}, timeout)
    reply.pop("ok", None)
    return reply


def _ask(path, request, timeout):
    import socket

    path = path or os.environ.get(SOCKET_VAR)
    if not path:
        raise ConfigError(
            SOCKET_VAR + " is not set: this program is not running as a Drover "
            "process task"
        )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(request).encode("utf-8") + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        raise ConfigError("asking the task socket %s: %s" % (path, e)) from e
    try:
        reply = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError("the task socket %s answered something not JSON: %r" % (path, data[:200])) from e
    if not reply.get("ok"):
        raise ConfigError("the task socket %s answered: %s" % (path, reply.get("error")))
    return reply
