"""``python -m clusterexec``: the same as the ``clusterexec`` command."""

from __future__ import annotations

import sys

from clusterexec.cli.main import main

sys.exit(main())
