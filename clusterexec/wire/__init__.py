"""The wire: frames, message kinds, the handshake, sealing, the channel and the poller. Imports
only ``clusterexec.errors``.
"""
