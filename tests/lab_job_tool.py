"""Create, read and stop a Transformer Lab job with whichever `lab` SDK is first on the path:
the tests run it under an older SDK than the one in the venv, as that SDK's Lab would.

    python lab_job_tool.py create <experiment>   -> prints the job id
    python lab_job_tool.py state <job_id>        -> prints {"status", "progress", "job_data"}
    python lab_job_tool.py stop <job_id>         -> sets job_data.stop, as the Stop button does
"""

import asyncio
import json
import sys

from lab import Experiment, Job


async def main(command: str, arg: str) -> None:
    if command == "create":
        experiment = await Experiment.create_or_get(arg, create_new=True)
        print((await experiment.create_job()).id)
    elif command == "state":
        job = await Job.get(arg)
        print(json.dumps({"status": await job.get_status(), "progress": await job.get_progress(),
                          "job_data": await job.get_job_data()}))
    elif command == "stop":
        await (await Job.get(arg)).update_job_data_field("stop", True)


asyncio.run(main(sys.argv[1], sys.argv[2]))
