"""Deploy lowbit's quantized models to mobile and edge runtimes with lowbit's own scales."""
