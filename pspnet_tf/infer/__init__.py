"""Using a trained model: the ``Predictor`` and the evaluation modes (``predictor``), mIoU
reports (``evaluation``), images and videos in and out (``predict``), SavedModel, TFLite
and ONNX (``export``)."""
