"""Video clips in the outputs: each video's sampled frames folded into one prediction and one image row."""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any, Optional

from ..card.video import parse_frame_key, video_key
from ..speciesnet.ensemble import Classification, Failure
from .taxa import final

__all__ = ["MEDIATYPES", "aggregate_videos", "deciding_frame", "video_detections", "video_event", "video_fields"]

MEDIATYPES = {".mp4": "video/mp4", ".avi": "video/x-msvideo", ".mov": "video/quicktime"}


def _failed(pred: dict, image: dict) -> bool:
    return bool(pred.get("failures")) or image["status"] == "failed"


def _best(pred: dict) -> Optional[float]:
    """The highest final-label probability among a frame's non-blank detections, else None."""
    scores = [decision.probability for decision in map(final, pred.get("detections") or [])
              if decision.label != Classification.BLANK.value]
    return max(scores) if scores else None


def deciding_frame(frames: list[tuple[int, dict]]) -> int:
    """The frame whose non-blank label scores highest (earliest on ties); the first frame when all are blank."""
    scored = [(score, -number) for number, pred in frames if (score := _best(pred)) is not None]
    return -max(scored)[1] if scored else frames[0][0]


def _video_entry(video: str, entries: list[tuple[dict, dict, Optional[int], Optional[float]]]) -> tuple[dict, dict]:
    """One video's prediction and image row from its frames (or from its own record when it was unreadable)."""
    live = [e for e in entries if e[1]["status"] != "vanished"] or entries
    frames = sorted((e for e in live if e[2] is not None), key=lambda e: e[2]) or None
    if frames is None:
        pred, image = live[0][0], live[0][1]
        return {**pred, "video": {"frame_rate": -1.0, "frames_processed": []}}, image
    fps = float(frames[0][3])
    ok = [(n, pred) for pred, image, n, _ in frames if not _failed(pred, image)]
    bad = [(n, pred.get("failure_reason") or image["reason"]) for pred, image, n, _ in frames if _failed(pred, image)]
    first_pred, first_image = frames[0][0], frames[0][1]
    filepath = first_image["filepath"][: len(first_image["filepath"]) - len(first_image["key"])] + video
    vanished = all(image["status"] == "vanished" for _, image, _, _ in frames)
    image_row = {**first_image, "key": video, "filepath": filepath}
    if not ok:
        reason = f"no sampled frame could be decoded (frame {bad[0][0]}: {bad[0][1]})"
        prediction = {"filepath": filepath, "failures": [Failure.DETECTOR.name], "failure_reason": reason,
                      "model_version": first_pred.get("model_version"),
                      "video": {"frame_rate": fps, "frames_processed": [], "frames_failed": [n for n, _ in bad]}}
        image_row.update(status="vanished" if vanished else "failed", reason=reason)
        return prediction, image_row
    number = deciding_frame(ok)
    chosen = dict(ok)[number]
    decided = next(image for _, image, n, _ in frames if n == number)
    notes = [f"{len(bad)} of {len(frames)} sampled frames unreadable (frame {bad[0][0]}: {bad[0][1]})"] if bad else []
    notes += sorted({image["reason"] for _, image, _, _ in frames if image["status"] == "warning" and image["reason"]})
    status = "vanished" if vanished else ("warning" if notes else "ok")
    image_row.update(width=decided["width"], height=decided["height"], status=status, reason="; ".join(notes) or None)
    video_info: dict[str, Any] = {"frame_rate": fps, "frames_processed": [n for n, _ in ok], "frame_number": number,
                                  "frames": [{"frame_number": n, "detections": p.get("detections") or []}
                                             for n, p in ok]}
    if bad:
        video_info["frames_failed"] = [n for n, _ in bad]
    return {**chosen, "filepath": filepath, "video": video_info}, image_row


def aggregate_videos(predictions: list[dict], images: list[dict]) -> tuple[list[dict], list[dict]]:
    """Photos unchanged; each video's frames folded into one prediction (the deciding frame's, with `video`:
    frame_rate, frames_processed, frame_number, frames) and one image row, in key order."""
    by_path = {image["filepath"]: image for image in images}
    groups: dict[str, list] = defaultdict(list)
    photos: list[tuple[dict, dict]] = []
    for pred in predictions:
        image = by_path.get(pred["filepath"])
        video = video_key(image["key"]) if image is not None else None
        if video is None:
            photos.append((pred, image))
            continue
        parsed = parse_frame_key(image["key"])
        groups[video].append((pred, image, parsed[1] if parsed else None, parsed[2] if parsed else None))
    if not groups:
        return predictions, images
    rows = photos + [_video_entry(video, entries) for video, entries in groups.items()]
    rows.sort(key=lambda row: row[1]["key"] if row[1] is not None else row[0]["filepath"])
    return [pred for pred, _ in rows], [image for _, image in rows if image is not None]

def video_fields(pred: dict) -> dict:
    """MegaDetector 1.6's per-video fields (frame_rate, frames_processed) of a folded prediction, else {}."""
    video = pred.get("video")
    if video is None:
        return {}
    return {"frame_rate": video["frame_rate"], "frames_processed": list(video["frames_processed"])}


def video_detections(pred: dict) -> list[dict]:
    """A photo's detections, or every processed frame's detections of a video, each with its `frame_number`."""
    video = pred.get("video")
    if video is None:
        return pred.get("detections") or []
    return [{**det, "frame_number": frame["frame_number"]} for frame in video.get("frames", [])
            for det in frame["detections"]]


def video_event(rows: list[dict], pred: dict, start: datetime) -> list[dict]:
    """Camtrap DP observations of a video span its processed frames (eventStart at the video's start, eventEnd
    at its last processed frame, eventID the video); a photo's rows are returned as they are."""
    video = pred.get("video")
    if not video or not video["frames_processed"] or video["frame_rate"] <= 0:
        return rows
    end = start + timedelta(seconds=max(video["frames_processed"]) / video["frame_rate"])
    return [{**row, "eventID": row["mediaID"], "eventEnd": end.replace(microsecond=0).isoformat()} for row in rows]
