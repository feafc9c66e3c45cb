"""PROTEUS: the GPT model, optimiser, data, training, quantisation and evaluation."""

__version__ = "0.1.0"
