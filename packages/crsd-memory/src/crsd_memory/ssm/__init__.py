"""SSM-family backbones: S4D, S5, LinOSS, RetNet retention and a Samba-style hybrid.

One module per model (``s4d``, ``s5``, ``linoss``, ``retnet``, ``samba``), the shared
pieces in ``common`` (residual blocks, the layer stack) and ``scan`` (the associative scan),
and the obviously-correct sequential references in ``reference``.
"""
