"""Everything cke does on nodes: the SSH layer and, later, node runtimes."""
