"""The out-of-distribution detector of a trained checkpoint on images it was not trained for, through predict's
own path (dermaops.prediction decoding, dermaops.guards features and detector): prints JSON.

- genuine: the 70 full-resolution originals of ../shared/data/ham10000-sample (in distribution: the flagged
  share is the false-flag rate on originals, the detector having been fitted on the 200 px pack's images);
- photographs: the photographs scikit-image ships (skimage.data: people, animals, objects, space, a retina,
  a stained tissue section), none dermatoscopy;
- blurred, overexposed, rotated_black_border: the 70 originals corrupted (dermaops.ood.corrupt).

The false-flag rate on the in-distribution TEST split is evaluate's (`metrics.json` test.ood), not this.

    python benchmarks/ood_detection.py --checkpoint cnn.pt
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT.parent / "shared" / "data" / "ham10000-sample"
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a cnn.pt whose meta carries the guards (train fits them)")
    parser.add_argument("--sample", default=str(SAMPLE), help="the full-resolution sample pack")
    args = parser.parse_args()

    import numpy as np
    from dermaops.checkpoint import load_checkpoint
    from dermaops.guards import detector, features
    from dermaops.imagecache import decode_image
    from dermaops.ood import CORRUPTIONS, corrupt

    from tests.support.ood_images import photograph_jpegs

    model, meta = load_checkpoint(args.checkpoint)
    found = detector(meta)
    if found is None:
        sys.exit(f"{args.checkpoint} carries no out-of-distribution detector (train fits it)")
    frame = meta.frame
    genuine = []
    for archive in sorted(Path(args.sample).glob("HAM10000_images_part_*.zip")):
        with zipfile.ZipFile(archive) as zf:
            genuine += [(name, zf.read(name)) for name in sorted(zf.namelist()) if name.endswith(".jpg")]
    with tempfile.TemporaryDirectory() as tmp:
        photos = [(p.name, p.read_bytes()) for p in photograph_jpegs(Path(tmp))]
    sets = {"genuine": genuine, "photographs": photos}
    sets |= {kind: [(name, corrupt(data, kind, name)) for name, data in genuine] for kind in CORRUPTIONS}

    out = {"checkpoint": args.checkpoint, "threshold": found.threshold, "frame": frame.describe()}
    for what, items in sets.items():
        pixels = np.stack([decode_image(data, frame, name) for name, data in items])
        scores = found.scores(features(model, pixels, meta, 64, "cpu"))
        flagged = scores > found.threshold
        out[what] = {
            "n": len(items),
            "flagged": int(flagged.sum()),
            "rate": round(float(flagged.mean()), 4),
            "median_score": round(float(np.median(scores)), 2),
        }
        if what == "photographs":
            out[what]["missed"] = [name for (name, _), f in zip(items, flagged, strict=True) if not f]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
