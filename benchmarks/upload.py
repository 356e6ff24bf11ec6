"""Upload latency to a distant object store: ``S3Storage.put`` of an image-sized body to a moto S3
server behind a TCP proxy that adds ``--rtt-ms`` to each round trip, against a plain boto3 client
doing the same put. boto3 sends ``Expect: 100-continue`` on every upload and waits a round trip for
the go-ahead; ``S3Storage`` does not for bodies up to 2 MiB, so its put should cost one round
trip, not two.

    python benchmarks/upload.py [--rtt-ms 40] [--kib 300] [--puts 10]"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._system import moto_s3  # noqa: E402
from inference_server.devtools.faults.proxy import TcpProxy  # noqa: E402


def median_ms(put, puts: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for i in range(puts):
        t = time.perf_counter()
        put(i)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, default=40.0)
    parser.add_argument("--kib", type=int, default=300, help="body size (a 512 px PNG is a few hundred KiB)")
    parser.add_argument("--puts", type=int, default=10)
    args = parser.parse_args()
    import boto3

    from inference_server.storage.s3 import S3Storage

    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(key, "x")
    body = os.urandom(args.kib * 1024)
    with moto_s3() as s3:
        host, port = s3.rsplit("/", 1)[1].split(":")
        proxy = TcpProxy((host, int(port)), name="storage")
        try:
            proxy.slow(args.rtt_ms / 1000)
            endpoint = f"http://127.0.0.1:{proxy.port}"
            store = S3Storage("s3://bench/upload", endpoint_url=endpoint, region="us-east-1")
            plain = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
            store.put("warm", body, "image/png")  # connections open on both sides
            plain.put_object(Bucket="bench", Key="warm", Body=body)
            ours = median_ms(lambda i: store.put(f"ours-{i}", body, "image/png"), args.puts)
            theirs = median_ms(lambda i: plain.put_object(Bucket="bench", Key=f"p{i}", Body=body), args.puts)
        finally:
            proxy.close()
    print(f"{args.kib} KiB put, {args.rtt_ms:g} ms round trip, median of {args.puts}:")
    print(f"  S3Storage.put     {ours:7.1f} ms  ({ours / args.rtt_ms:.2f} round trips)")
    print(f"  boto3 put_object  {theirs:7.1f} ms  ({theirs / args.rtt_ms:.2f} round trips)")


if __name__ == "__main__":
    main()
