"""Applications on top of the layers, installed as ``tnlayers.apps``: the ``tnlayers`` command (``cli``),
the showcase (``demo``) and the one training loop the demo and the paper reproductions share (``training``).

Unlike the core, these may import frameworks and the backends.
"""
