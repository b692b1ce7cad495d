"""Code and data in and out: cloudpickle, the shipping pickler, module shipping, the main script.
Imports only ``clusterexec.errors`` and ``clusterexec.wire``.
"""
