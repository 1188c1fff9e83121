"""GPU memory: the plan made before anything loads, and the simulation it is checked against.

Owns: reading a pipeline's components from their config files as meta-device models
(`components`), the per-stage memory plan and the choice of settings that fit (`plan`), and the
fake-tensor simulation of one training step (`simulate`, used by tests and bench/).
May import: the ground floor and `families` (each family's activation cost and its `predict`).
"""
