"""The one base class of vllm-haq's errors.

Every error the project raises on bad input (a checkpoint, a model, an option, calibration text, a
statistics file) derives from :class:`HAQError`, so a caller — the ``haq`` command line, a serving
script — can catch all of them in one ``except`` and print the message, which names the file, tensor
or option at fault. Each subclass also keeps its builtin base (``ValueError`` for bad input,
``RuntimeError`` for a conversion that cannot proceed), so existing ``except ValueError`` code works.
"""


class HAQError(Exception):
    """Bad input or an impossible request; the message says what, where and what to do."""
