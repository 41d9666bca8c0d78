"""egpu's tinygrad worker: runs GGUF models with their weights kept quantized on a tinygrad device."""
