"""One module per ``ruletag`` subcommand: ``serve``, ``validate``, ``test``, ``rules``
(check/compile), ``match``, ``dead_letter``. ``ruletag.cli`` only parses the arguments."""
