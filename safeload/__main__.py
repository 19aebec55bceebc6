from safeload.cli import entry

entry()
