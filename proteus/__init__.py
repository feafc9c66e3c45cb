"""PROTEUS: the GPT model, optimiser, data, training, quantisation and evaluation."""

__version__ = "0.2.0"
