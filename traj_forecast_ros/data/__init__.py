"""Training and evaluation data: physics-based synthetic scenes and the sharded on-disk dataset format.

``scenes``: the generator's configuration, scene kinds, visible layout and hidden state, drawn at random.
``render``: a scene to an RGB image (texture, shading, motion blur, anti-aliasing).
``synthetic``: pymunk simulation and exact dense ground-truth tracks; :func:`synthetic.write_dataset`.
``dataset``: the on-disk format and its reader (:class:`dataset.TrajectoryDataset`).
``dataset_writer``: writing it (:class:`dataset_writer.DatasetWriter`), also for user data from any point tracker
(:func:`dataset_writer.import_arrays`).
"""
