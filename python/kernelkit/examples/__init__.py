"""Runnable examples: ``python -m kernelkit.examples.NAME``.

- ``monarch_mlp``: project a trained MLP's linear layers onto Monarch matrices, fine-tune, compare.
"""
