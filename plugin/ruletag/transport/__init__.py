"""Sockets: the forward-protocol listener (``server``), the downstream client (``forwarder``)
and the dead letters the forwarder sets aside (``deadletter``)."""
