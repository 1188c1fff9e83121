"""Create, read and stop a Transformer Lab job with whichever `lab` SDK is first on the path:
the tests run it under an older SDK than the one in the venv, as that SDK's Lab would.
(The SDK's methods are coroutines from 0.0.6x on, plain functions before.)

    python lab_job_tool.py create <experiment>   -> prints the job id
    python lab_job_tool.py state <job_id>        -> prints {"status", "progress", "job_data"}
    python lab_job_tool.py stop <job_id>         -> sets job_data.stop, as the Stop button does
"""

import asyncio
import inspect
import json
import sys

from lab import Experiment, Job


def done(value):
    return asyncio.run(value) if inspect.isawaitable(value) else value


def main(command: str, arg: str) -> None:
    if command == "create":
        experiment = done(Experiment.create_or_get(arg, create_new=True))
        print(done(experiment.create_job()).id)
    elif command == "state":
        job = done(Job.get(arg))
        print(json.dumps({"status": done(job.get_status()), "progress": done(job.get_progress()),
                          "job_data": done(job.get_job_data())}))
    elif command == "stop":
        done(done(Job.get(arg)).update_job_data_field("stop", True))


main(sys.argv[1], sys.argv[2])
