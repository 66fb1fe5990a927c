"""Encoding throughput: images/s of `far-scale data encode` vs a decode-only pass over the same JPEGs.

Decode-only (JPEG decode + ADM crop in the DataLoader) is the practical CPU limit of the job. Measured
for 1 and 2 loader workers, writing shards to local disk and to S3 (a moto server on 127.0.0.1 that this
script starts). Results: benchmarks/results/encode_throughput__*.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.report import (
    command_line,
    describe_machine,
    load_results,
    markdown_table,
    save_result,
    write_doc_section,
)
from data_prep.encode import EncodeJob, _ImageDataset, job_images, run_encode
from data_prep.fit_codec import fit_pca_codec
from data_prep.synth import SynthSpec, write_dataset
from far_scale.local_s3 import LocalS3

BENCHMARK = "encode_throughput"


def decode_only(job: EncodeJob) -> float:
    images = job_images(job)
    loader = DataLoader(
        _ImageDataset(images, list(range(len(images))), job.image_size),
        batch_size=job.batch_size,
        num_workers=job.loader_workers,
    )
    start = time.perf_counter()
    count = sum(batch[0].shape[0] for batch in loader)
    return count / (time.perf_counter() - start)


def encode(job: EncodeJob) -> float:
    summary = run_encode(job)
    return summary.images_encoded / summary.seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=256, help="source JPEG size (cropped to --image-size)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--no-s3", action="store_true")
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    classes = 10
    tmp = Path(tempfile.mkdtemp(prefix="far-scale-encode-bench-"))
    rows = []
    moto = None
    try:
        images = write_dataset(
            tmp / "images", SynthSpec(classes, args.images // classes, args.resolution), progress=False
        )
        weights = tmp / "pca.safetensors"
        fit_pca_codec(str(images), str(weights), args.image_size, 8, 16, 256, 100_000, 0)
        targets = [("local", str(tmp / "out"))]
        if not args.no_s3:
            moto = LocalS3("bench", "bench")
            os.environ.update(moto.env)  # this process only: s3fs reads the standard AWS variables
            import fsspec

            fsspec.filesystem("s3").mkdir("bench")
            targets.append(("s3 (moto)", "s3://bench/out"))
        for workers in (int(w) for w in args.workers.split(",")):
            base = dict(
                src=str(images),
                codec="pca",
                codec_weights=str(weights),
                image_size=args.image_size,
                images_per_shard=250,
                batch_size=64,
                loader_workers=workers,
                progress=False,
            )
            rate = decode_only(EncodeJob(dst=str(tmp / "unused"), **base))
            rows.append(["decode only", "-", workers, f"{rate:.0f}"])
            print(rows[-1], flush=True)
            for name, dst in targets:
                rate = encode(EncodeJob(dst=f"{dst}-{workers}", **base))
                rows.append(["encode (pca)", name, workers, f"{rate:.0f}"])
                print(rows[-1], flush=True)
    finally:
        if moto is not None:
            moto.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    machine = describe_machine(torch.device("cpu"))
    result = {
        "machine": machine,
        "rows": rows,
        "images": args.images,
        "resolution": args.resolution,
        "image_size": args.image_size,
        "command": command_line("encode_throughput.py", argv),
    }
    if args.no_docs:
        return
    save_result(BENCHMARK, "cpu", result)
    parts = ["## Encoding throughput (`benchmarks/encode_throughput.py`)", ""]
    for res in load_results(BENCHMARK):
        m = res["machine"]
        parts += [
            f"### {m['name']} ({m['cpu_count']} cores), {res['images']} synthetic {res['resolution']} px JPEGs "
            f"-> {res['image_size']} px, PCA codec",
            f"Date: {res['date']}. Command: `{res['command']}`",
            "",
            markdown_table(["pass", "output", "loader workers", "images/s"], res["rows"]),
            "",
        ]
    write_doc_section(BENCHMARK, "\n".join(parts))


if __name__ == "__main__":
    main()
