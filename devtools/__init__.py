"""Development tools that are not part of the installed product: the local stack (``make up``),
the shop workload generator, the test/benchmark harness and the topic read-back helper.

Importable from a source checkout (``make`` installs the project in editable mode); a wheel
built from this repository leaves this package out."""
