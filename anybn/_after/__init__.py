"""After training: fold a batch norm into the layer before it, and recalibrate its statistics.

:mod:`.fold` folds an eval-mode batch norm into the weight and bias of the
linear or convolution layer before it (:func:`anybn.fold`); :mod:`.recalibrate`
recomputes the running statistics of :class:`anybn.BatchNorm` layers from data
(:func:`anybn.recalibrate`), and holds the accumulators and the cross-rank merge
that :func:`anybn.torch.recalibrate` shares.
"""
