"""Which images a `dermaops_predict` run reads: the folder an Asset event names, else the run's param.

A producer that has finished uploading a folder of new images emits an event on the incoming-images
Asset with `extra={"images": "<the folder's s3:// prefix>"}` (from a task's outlet_events, or with
`POST /api/v2/assets/events`). Airflow hands a run every event queued since the previous run, so
two folders landing close together reach one run: it then reads their common prefix, which holds
both (and whatever else is under it), rather than predicting only the last one.
"""

from __future__ import annotations

EXTRA_KEY = "images"


def _common_prefix(folders: list[str]) -> str:
    split = [f.rstrip("/").split("/") for f in folders]
    common = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return "/".join(common)


def images_to_predict(params, triggering_asset_events=None) -> str:
    """The `--images` of this run: the folder(s) named by its triggering events, else `params.images`."""
    folders = []
    for events in (triggering_asset_events or {}).values():
        for event in events:
            folder = (getattr(event, "extra", None) or {}).get(EXTRA_KEY)
            if isinstance(folder, str) and folder.strip() and folder not in folders:
                folders.append(folder.strip())
    if not folders:
        return params["images"]
    if len(folders) == 1:
        return folders[0]
    common = _common_prefix(folders)
    # "s3://bucket" alone would read the whole bucket: never widen past the incoming root of the param.
    return common if len(common) > len("s3://") and common.count("/") >= 3 else params["images"]
