"""The web console (``cutover console``, docs/CONSOLE.md): the CLI's face in a browser, behind a
login. It calls the same control-plane functions as the CLI; only :mod:`cli` imports it."""
