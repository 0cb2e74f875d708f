"""Text: the embedded BPE tokenizer, the Qwen2.5/Qwen3 chat templates, and tool-call parsing."""
