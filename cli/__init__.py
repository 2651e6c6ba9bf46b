"""The ``cutover`` command line: argument parsing and one thin module per command
(``cli/commands``). It sits on top: it may import the control plane, the producers, the
consumers and the core; nothing imports it."""
