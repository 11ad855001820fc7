"""The ``zeroloss`` command: a click group whose commands live in the modules of this package,
each a thin layer over one library function.

========================  ======================================================================================
module                    commands
========================  ======================================================================================
:mod:`.core`              ``init``, ``status``, ``broker``, ``demo``
:mod:`.relay`             ``relay``
:mod:`.messages`          ``show`` (any state); ``failed``, ``doubt``, ``malformed`` (list, show, retry, purge)
:mod:`.checks`            ``doctor``, ``audit``
:mod:`.deadletters`       ``dlq`` (list, show, replay)
========================  ======================================================================================
"""

import zeroloss.cli.checks
import zeroloss.cli.core
import zeroloss.cli.deadletters
import zeroloss.cli.messages
import zeroloss.cli.relay  # noqa: F401  (importing the modules registers their commands)
from zeroloss.cli._base import main

__all__ = ["main"]
