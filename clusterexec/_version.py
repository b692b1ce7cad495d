"""The clusterexec version, in a module of its own so the node can read it cheaply."""

__version__ = "0.1.0"
