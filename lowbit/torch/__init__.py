"""PyTorch backend: weight quantization of nn.Modules through lowbit.numerics."""
