"""The cost of several faces in preprocessing: mouth-ROI fps with 1, 2 and 4 talking faces in the frame.

    python -m bench.bench_faces [--frames 250] [--workers 2]

Synthetic clips (`deploy/local/sample_media.py`), every face the same size (cells of 320×480 side by
side: 640×480 for one and two faces, 1280×480 for four), frames rendered up front. Each clip is run
with the default speaker (`largest`: every face followed, one mouth cropped) and with track ROIs
(`crop_tracks`: every face's mouth cropped, as `center`, a hint, `speaking` and `all` need). The
baseline is the one-face clip in the same run.
"""

from __future__ import annotations

import argparse
import time

from cpu_worker.landmarks import preload_models
from cpu_worker.mouth_roi import extract_mouth_rois
from deploy.local.sample_media import make_face_frames

LAYOUTS = {1: ((640, 480), (1, 1)), 2: ((640, 480), (2, 1)), 4: ((1280, 480), (4, 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=250)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs")
    args = parser.parse_args()
    preload_models(args.workers)
    extract_mouth_rois(list(make_face_frames(30)), workers=args.workers)  # warm caches
    rows = []
    base: dict[bool, float] = {}
    for faces, (size, grid) in LAYOUTS.items():
        frames = list(make_face_frames(args.frames, size=size, seed=11, grid=grid))
        for crop in (False, True):
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                result = extract_mouth_rois(frames, workers=args.workers, crop_tracks=crop)
                best = min(best, time.perf_counter() - started)
            fps = args.frames / best
            base.setdefault(crop, fps)
            rows.append((faces, f"{size[0]}x{size[1]}", "tracks cropped" if crop else "default", len(result.tracks),
                         round(fps, 1), round(base[crop] / fps, 2), result.stats["detector_calls"]))
        del frames
    print(f"{args.frames} frames, {args.workers} workers, best of {args.repeats}")
    print("| faces | frame | mode | tracks found | fps | time vs 1 face | detector calls |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
