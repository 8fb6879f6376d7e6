"""Quantization: block codecs, quantized tensors, importance matrices, plans."""
