"""Session-wide test set-up. Triton kernels run in the interpreter on machines without CUDA;
the flag must be set before any kernel module is imported (triton reads it at decoration)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tiny models' products are all small: tune them anyway (kernels/gemv_tuner.py), as a real model's would be
os.environ.setdefault("RAYSPEED_GEMV_TUNE_MIN_BYTES", "0")

torch.set_num_threads(1)     # 2 cores shared with Ray workers: one thread each keeps the suite fast


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole test session: 4 logical CPUs (oversubscribing the 2 cores
    is fine for tiny models), no dashboard; torn down at the end."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=True,
             runtime_env={"env_vars": {"TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0")}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on a free port with one bucket; yields the storage options for s3fs."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}
        boto3.client("s3", aws_access_key_id="testing", aws_secret_access_key="testing",
                     **client).create_bucket(Bucket="ckpt-bucket")
        yield {"key": "testing", "secret": "testing", "skip_instance_cache": True, "client_kwargs": client}
    finally:
        server.stop()
