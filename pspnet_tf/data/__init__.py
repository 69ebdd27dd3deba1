"""Datasets: folder layouts (``layouts``), the ``tf.data`` pipeline and its checks
(``pipeline``), the paper's augmentation (``augment``), the checked image reader
(``images``), class names and palettes (``classes``), the generated demo dataset
(``demo``)."""
