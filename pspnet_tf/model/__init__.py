"""The network: backbones (``backbones``), the few custom layers (``layers``), the PSPNet
graph and the metadata a model carries (``network``), ``build_pspnet`` and loading PSPNet
weights (``build``), loading weights by layer name (``named_weights``)."""
