"""The network and what it is stored as: the 3D U-Net, the CGC module and its losses, oneDNN's
convolutions inside XLA:CPU, the train state and optimiser, orbax checkpoints.

May import: core, runtime, imaging, labels.
"""
