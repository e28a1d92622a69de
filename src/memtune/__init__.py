"""memtune: fine-tune causal LMs on small GPUs, and measure what each memory technique costs and buys.

    model, tokenizer = memtune.load_model("tiny")     # memtune train's build, from Python
    report = memtune.apply(model_you_built)           # the techniques on your own model (Trainer, TRL)
    memtune.estimate(model="llama-3.1-8b", seq_len=32768)
    memtune.fit(gpu_memory="24GiB", model="llama-3.1-8b")
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "apply", "estimate", "fit"]


def __getattr__(name: str):
    # torch and transformers load on first use, so `import memtune` (and the CLI's --help) stay fast
    if name in ("load_model", "apply", "estimate", "fit"):
        from memtune import api

        return getattr(api, name)
    raise AttributeError(f"module 'memtune' has no attribute {name!r}")
