"""Solvers: LightningModules whose parameters are the pseudo-eigenvectors."""
