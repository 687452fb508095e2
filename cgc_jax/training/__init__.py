"""What feeds and records training: the step-indexed input pipeline of crops, the loss and the
jitted train step, and the run log (metrics, TensorBoard, curves).

May import: core, runtime, imaging, labels, model.
"""
