"""tasktune: adapt a decoder LLM to a task with LoRA and measure what it bought."""

__version__ = "0.1.0"
