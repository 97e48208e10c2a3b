"""Where a chunk goes after the filter and when it counts as safe (the ack point):
``pipeline`` (memory mode), ``durable`` (disk mode) over ``buffer`` (the disk buffer), and
``outputs`` (stdout/file JSON lines, and the fan-out to them and the forwarder)."""
