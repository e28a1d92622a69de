"""memtune: fine-tune causal LMs on small GPUs, and measure what each memory technique costs and buys."""

__version__ = "0.1.0"
