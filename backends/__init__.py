"""Framework adapters, installed as ``tnlayers.backends``: one module per framework.

``tnlayers.backends.numpy`` is always available; the others need their framework installed.
"""
