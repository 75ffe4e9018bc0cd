"""Volume I/O, dataset description and validation, preprocessing, the tf.data pipeline."""
