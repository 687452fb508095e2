"""Research tools, not the product: the experiment tables and their selection protocol, the
benchmarks, other convolution formulations and the same U-Net in PyTorch.

May import everything; nothing imports it.
"""
