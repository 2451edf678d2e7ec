"""Times Ray's Jobs API with and without a pip runtime_env, for Drover's envs benchmark.

Run with the Python of a virtual environment that has `ray[default]` installed:

    python bench/ray_runtime_env.py --requirement six==1.16.0 --warm-runs 10

It starts a throwaway Ray head (its own temp dir, so the runtime_env cache starts
empty), submits jobs through the Jobs API and prints one JSON object with the
submit-to-finished times in milliseconds: `plain` (no runtime_env), `cold` (the first
job with the pip list, which builds the environment) and `warm` (later jobs with the
same list, served from Ray's cache). The head is stopped on the way out.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def ray_cli():
    # The `ray` script sits beside this interpreter in the virtual environment.
    return os.path.join(os.path.dirname(sys.executable), "ray")


def wait_for(client, job_id, timeout):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return status
        time.sleep(0.01)
    raise TimeoutError(f"job {job_id} did not finish in {timeout}s")


def timed(client, entrypoint, runtime_env, timeout):
    from ray.job_submission import JobStatus

    start = time.monotonic()
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    status = wait_for(client, job_id, timeout)
    elapsed = (time.monotonic() - start) * 1000.0
    if status != JobStatus.SUCCEEDED:
        logs = client.get_job_logs(job_id)
        raise RuntimeError(f"ray job {entrypoint!r} ended {status}: {logs}")
    return elapsed


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--requirement", action="append", required=True)
    parser.add_argument("--warm-runs", type=int, default=10)
    parser.add_argument("--port", type=int, default=8265)
    args = parser.parse_args()

    temp = tempfile.mkdtemp(prefix="drover-bench-ray-")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    subprocess.run(
        [
            ray_cli(), "start", "--head", "--disable-usage-stats",
            f"--temp-dir={temp}", "--include-dashboard=true",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={args.port}",
            "--num-cpus=2",
        ],
        check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        from ray.job_submission import JobSubmissionClient

        url = f"http://127.0.0.1:{args.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                client = JobSubmissionClient(url)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        pip_env = {"pip": args.requirement}
        entry = "python -c 'import six'"
        # One untimed job first, so Ray's first-job start-up cost is not billed to
        # either side.
        timed(client, "python -c 'import sys'", None, 300)
        plain = [timed(client, "python -c 'import sys'", None, 300) for _ in range(args.warm_runs)]
        cold = timed(client, entry, pip_env, 900)
        warm = [timed(client, entry, pip_env, 300) for _ in range(args.warm_runs)]
        import ray

        print(json.dumps({"version": ray.__version__, "plain": plain, "cold": cold, "warm": warm}))
    finally:
        subprocess.run([ray_cli(), "stop", "--force"], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
