"""The Mininet lab: load generator, results tooling, topologies and the experiment runner.

Importable lab code lives here; `mininet/` at the top of the repository holds
runnable scripts only (a package named `mininet` would shadow Mininet itself).
"""
