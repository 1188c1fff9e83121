"""Diffusion Trainer: LoRA fine-tuning for Stable Diffusion 1.x/2.x, SDXL, SD3 and Flux.

Entry point for the command line (`python main.py …`) and for Transformer Lab, whose plugin
harness imports this file and calls main(). See README.md.
"""

from diffusion_trainer.cli import main as run


def main(argv=None) -> int:
    code = run(argv)
    if code:
        raise SystemExit(code)  # the Lab's harness ignores return values; exit codes it sees
    return 0


if __name__ == "__main__":
    main()
