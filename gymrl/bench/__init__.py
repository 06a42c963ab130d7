"""``gymrl bench``: every benchmark suite, a module each; ``suites`` holds the table ``--suite`` picks from,
``report`` the files and tables they all write, ``trl_baseline`` the TRL runs the vs-trl suite compares with."""
