"""`python -m diffusion_trainer.launch [main.py's arguments]`: main.py on every visible GPU.

The public command (task.yaml's run line, the README's multi-GPU line) stays this short and
stable; what it does is in run/launch.py.
"""

from .run.launch import main

if __name__ == "__main__":
    main()
