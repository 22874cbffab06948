"""Full-resolution decoding: images/s per core, JPEG draft mode against full decode + resize; prints one JSON object.

Input: the 70 full-resolution (600x450) originals of ../shared/data/ham10000-sample, held as bytes in
memory (so disk and zip reads are not measured), replicated by cycling through them for each timing.

    draft: dermaops.imagecache.decode_image, the cache's recipe (draft() = DCT scaling to the smallest
           1/1, 1/2, 1/4 or 1/8 scale still >= the target, then a bicubic resize)
    full:  dermaops.imagecache.decode_full (decode every pixel, then the same resize)

    bound: decode at the smallest DCT scale (1/8) and no resize at all. Huffman decoding of the whole
           file costs the same at every scale, so no draft path (whatever the target size) can beat
           this rate: bound/full is the largest speedup draft mode can give on these files.

Per core = CPU seconds of this one process (time.process_time), so a neighbour's load on a shared
machine does not count; the two paths are timed alternately for several rounds and the medians are
reported. Also reported: the worst and mean PSNR of draft against full over the 70 images, the DCT
scale draft picked, and the wall-clock images/s of the cache builder's process pool (decode_all).

    python benchmarks/decode.py                   # 224 px (the goal: draft/full >= 3x) and 64 px
    python benchmarks/decode.py --sizes 224 --seconds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACK = ROOT.parent / "shared" / "data" / "ham10000-sample"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pack", type=Path, default=PACK, help="a pack with full-resolution JPEGs in its zips")
    p.add_argument("--sizes", type=int, nargs="+", default=[224, 64])
    p.add_argument("--seconds", type=float, default=2.0, help="CPU seconds per timing")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pool-images", type=int, default=1400, help="images decoded by the process-pool timing")
    return p.parse_args(argv)


def originals(pack: Path) -> list[bytes]:
    out = []
    for name in ("HAM10000_images_part_1.zip", "HAM10000_images_part_2.zip"):
        with zipfile.ZipFile(pack / name) as zf:
            out += [zf.read(info) for info in zf.infolist() if info.filename.lower().endswith(".jpg")]
    if not out:
        raise SystemExit(f"decode: no .jpg in the zips of {pack}")
    return out


def per_core_rate(fn, jpegs: list[bytes], size: int, seconds: float) -> float:
    n, started = 0, time.process_time()
    while time.process_time() - started < seconds:
        for data in jpegs:
            fn(data, size)
        n += len(jpegs)
    return n / (time.process_time() - started)


def decode_bound(data: bytes, size: int):
    """The cheapest decode there is: 1/8 DCT scale, RGB, no resize (`size` unused)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (1, 1))
        return img.convert("RGB")


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def main(argv=None) -> dict:
    from dermaops.imagecache import decode_all, decode_full, decode_image
    from PIL import Image

    args = parse_args(argv)
    jpegs = originals(args.pack)
    with Image.open(io.BytesIO(jpegs[0])) as img:
        original_size = img.size
    result = {"images": len(jpegs), "original_size": list(original_size), "cpu_count": os.cpu_count(), "sizes": {}}
    for size in args.sizes:
        with Image.open(io.BytesIO(jpegs[0])) as img:
            img.draft("RGB", (size, size))
            drafted = img.size
        scores = [psnr(decode_image(d, size), decode_full(d, size)) for d in jpegs]
        draft, full, bound = [], [], []
        for _ in range(args.rounds):
            full.append(per_core_rate(decode_full, jpegs, size, args.seconds))
            draft.append(per_core_rate(decode_image, jpegs, size, args.seconds))
            bound.append(per_core_rate(decode_bound, jpegs, size, args.seconds))
        items = [(str(i), jpegs[i % len(jpegs)]) for i in range(args.pool_images)]
        started = time.monotonic()
        decoded = sum(len(ids) for ids, _ in decode_all(items, size))
        pool_rate = decoded / (time.monotonic() - started)
        d, f, b = statistics.median(draft), statistics.median(full), statistics.median(bound)
        result["sizes"][str(size)] = {
            "draft_decoded_size": list(drafted),
            "draft_images_per_s_per_core": round(d, 1),
            "full_images_per_s_per_core": round(f, 1),
            "speedup": round(d / f, 2),
            "bound_images_per_s_per_core": round(b, 1),
            "speedup_bound": round(b / f, 2),
            "psnr_db_min": round(min(scores), 2),
            "psnr_db_mean": round(statistics.fmean(scores), 2),
            "process_pool_images_per_s_wall": round(pool_rate, 1),
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
