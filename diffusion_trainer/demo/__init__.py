"""The built-in demo and the offline stand-ins the tests and the benchmark use.

Owns: the demo run (`star_demo`: `python main.py` with no arguments), the shapes pictures it and
the tests draw (`shapes`), tiny pipelines built from configs with local tokenizers (`tiny_models`; FLUX.2's in `tiny_flux2`),
and the shapes world's base model, its pretraining script and its scorer (`shapes_world/`).
May import: the ground floor (`reporting`) and `run` to start a run, like any user of the trainer;
only the command line (`cli`) imports it, for the demo run.
"""
