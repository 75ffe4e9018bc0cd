"""Whole-volume prediction from a patch-trained model.

``sliding_window`` turns a model that sees fixed-size windows into softmax probabilities for a
volume of any size (Gaussian-blended, batched, optionally mirrored); ``postprocessing`` holds
the label-map clean-ups applied after the argmax.
"""
