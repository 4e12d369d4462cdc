"""In-process backends (transformers, llama.cpp); each module imports its heavy library lazily."""
