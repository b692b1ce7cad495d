"""The client side: ``ClusterExecutor``, its I/O thread, tasks and futures, the link to each node."""
