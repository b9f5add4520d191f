"""Predict image files against a cnnlab model served by `cnnlab serve` or `mlflow models serve` (standard library only).

    python serving/client.py http://127.0.0.1:5000 serving/samples/*.jpg
    python serving/client.py http://127.0.0.1:5000 serving/samples/two_faces.jpg --detect-faces
"""
from __future__ import annotations

import argparse
import base64
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def payload(files: list[Path], detect_faces: bool = False) -> dict:
    """The REST request: one row per file in the `image` column, base64 of the file's bytes."""
    body = {"dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(f.read_bytes()).decode("ascii")] for f in files]}}
    if detect_faces:
        body["params"] = {"detect_faces": True}
    return body


def invoke(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    """POST to URL/invocations; (HTTP status, decoded JSON answer), errors included."""
    request = urllib.request.Request(url.rstrip("/") + "/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        text = e.read().decode(errors="replace")
        try:
            return e.code, json.loads(text)
        except json.JSONDecodeError:
            return e.code, {"message": text}


def describe(row: dict) -> str:
    probs = {k.removeprefix("prob_"): v for k, v in row.items() if k.startswith("prob_")}
    top = ", ".join(f"{k} {v:.2f}" for k, v in sorted(probs.items(), key=lambda kv: -kv[1])[:3])
    return f"{row['label']} ({top})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="server root, e.g. http://127.0.0.1:5000")
    parser.add_argument("files", nargs="+", type=Path, help="PNG, JPEG or BMP files")
    parser.add_argument("--detect-faces", action="store_true", help="find faces and classify each one")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer as it is")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    status, answer = invoke(args.url, payload(args.files, args.detect_faces), args.timeout)
    if status != 200:
        print(f"HTTP {status}: {answer.get('message', answer)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    for f, row in zip(args.files, answer["predictions"]):
        if not args.detect_faces:
            print(f"{f}: {describe(row)}")
            continue
        print(f"{f}: {row['message']}")
        for d in row["detections"]:
            print(f"  face at x={d['box']['x']} y={d['box']['y']} {d['box']['w']}x{d['box']['h']}: {describe(d)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
