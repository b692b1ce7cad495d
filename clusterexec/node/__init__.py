"""The node program (``python -m clusterexec.node``): the server, sessions, workers. Never imports
``clusterexec.client`` or ``clusterexec.launch``.
"""
