"""tokenfabric controller: a desired-state reconciler that programs P4 switches."""
