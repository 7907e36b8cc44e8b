"""Runnable examples: ``python -m kernelkit.examples.NAME``.

- ``monarch_mlp``: project a trained MLP's linear layers onto Monarch matrices, fine-tune, compare.
- ``sparse_ift``: dense vs Sparse Wide (static, RigL, SET) at the same FLOPs on a teacher-MLP task.
- ``vq4dit``: a tiny DiT quantized to 2 bits (k-means), then VQ4DiT's zero-data calibration; block and
  sample errors against the full-precision model.
"""
