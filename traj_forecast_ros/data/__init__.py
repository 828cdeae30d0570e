"""Training and evaluation data: physics-based synthetic scenes and the sharded on-disk dataset format.

``synthetic``: pymunk scenes rendered to RGB with exact dense ground-truth tracks (:func:`synthetic.write_dataset`).
``dataset``: the on-disk format (:class:`dataset.DatasetWriter`, :class:`dataset.TrajectoryDataset`), also for user
data from any point tracker (:func:`dataset.import_arrays`).
"""
