"""Create, read and stop a Transformer Lab job with whichever `lab` SDK is first on the path:
the tests run it under an older SDK than the one in the venv, as that SDK's Lab would.
(The SDK's methods are coroutines from 0.0.6x on, plain functions before.)

    python lab_job_tool.py create <experiment>   -> @@<job id>@@
    python lab_job_tool.py state <job_id>        -> @@{"status", "progress", "job_data"} as JSON@@
    python lab_job_tool.py stop <job_id>         -> sets job_data.stop, as the Stop button does
"""

import asyncio
import inspect
import json
import sys

from lab import Experiment, Job


def done(value):
    return asyncio.run(value) if inspect.isawaitable(value) else value


def answer(value) -> None:
    """Between markers, in one write: older SDKs print banners, some from background threads."""
    sys.stdout.write(f"\n@@{value}@@\n")
    sys.stdout.flush()


def main(command: str, arg: str) -> None:
    if command == "create":
        if hasattr(Experiment, "create_or_get"):
            experiment = done(Experiment.create_or_get(arg, create_new=True))
        else:  # before 0.0.6x
            experiment = Experiment(arg, create_new=True)
        answer(done(experiment.create_job()).id)
    elif command == "state":
        job = done(Job.get(arg))
        answer(json.dumps({"status": done(job.get_status()), "progress": done(job.get_progress()),
                          "job_data": done(job.get_job_data())}))
    elif command == "stop":
        done(done(Job.get(arg)).update_job_data_field("stop", True))
        answer("stopped")


main(sys.argv[1], sys.argv[2])
