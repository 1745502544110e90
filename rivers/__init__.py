"""rivers: the per-node TCP proxy to the apiservers."""
