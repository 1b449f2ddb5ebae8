"""Work beyond one process, on Ray: calibration shards and candidate scoring as Ray tasks (``lowbit[ray]``)."""
