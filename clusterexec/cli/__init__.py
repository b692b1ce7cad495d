"""The ``clusterexec`` command: argument parsing and output only. Nothing imports it."""
