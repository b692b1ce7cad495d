"""Starting nodes and naming them: local nodes, SSH, node specs, node sets, cluster files."""
