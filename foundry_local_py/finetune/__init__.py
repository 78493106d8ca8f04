"""LoRA fine-tuning (``adapter train``) and export to llama.cpp's GGUF LoRA format.

Needs the ``[finetune]`` extra (torch, transformers, peft, gguf); the modules import them lazily,
so the core install imports this package without them.
"""
