"""A run, from validated parameters to its end status.

Owns: running one configuration and ending the job COMPLETE/STOPPED/FAILED with its exit status
(`job`), assembling a run from its parts (`train`), setting each part up from the parameters
(`setup`), the training loop (`loop`), step counts (`steps`), checkpoints and exact resume
(`checkpoint`), eval images (`evaluate`), the optimizer choices (`optimizers`), what differs
between processes (`processes`), the multi-GPU launcher (`launch`) and a debugging trace (`trace`).
May import: the ground floor, `families`, `data` and `outputs`. Not `lab` (the Lab hands its
reporter and folders in) and not `demo`. The parameters object is read in `job`, `train`, `setup`
and `optimizers`; the loop, checkpoints and evaluator get plain values.
"""
