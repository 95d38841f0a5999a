"""Part "quant": quantization of weights, activations, gradients and optimizer states."""
