"""Models that leave and models that come in: Hugging Face transformers and GGUF.

- ``hf.py``: a run as a Hugging Face GPT-2 folder (config, weights, model card), and
  GPT-2-family checkpoints imported as runs.
- ``hf_tokenizer.py``: minigpt's tokenizers as Hugging Face tokenizer files, and GPT-2's
  BPE files as minigpt's tiktoken tokenizer.
- ``gguf.py``: a run as a GGUF file for llama.cpp and ollama.

The heavy libraries (transformers, tokenizers, gguf) are imported inside the functions
that need them.
"""
