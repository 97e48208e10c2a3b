"""One module per ``ruletag`` subcommand: ``serve``, ``validate``, ``test``, ``rules`` (check /
compile), ``update``, ``explain`` and ``stats`` (``rules update|explain|stats``), ``match``,
``dead_letter``. ``ruletag.cli`` only parses the arguments."""
