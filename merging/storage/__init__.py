"""Bytes on disk: atomic outputs, safetensors and GGUF reading and streaming writes."""
