"""Sample-quality evaluation: ADM-style FID / sFID / IS / precision / recall (``metrics``,
``inception``, ``pixeldit_jax.evaluate``) and the offline Fashion-MNIST signal (``fmnist*``).

Submodules are imported explicitly; importing this package pulls in nothing heavy.
"""
