"""The 8×8 handwritten digits that ship with scikit-learn, as labelled
image examples for `tessera train` (data/digits/digits.jsonl), and as a
stream of pixel tokens for an ImageGPT (data/digits/pixels.bin).

Each line: {"pixels": [64 values in 0..1], "label": d, "text": caption,
"split": "train" | "val"}. The pixels are scikit-learn's 0..16 intensities
divided by 16, row-major; the last 297 of the 1,797 images are the
validation split. The caption ("a handwritten seven") is for two-tower
models.

Run from the repository root (scikit-learn 1.x):
    python3 -m venv /tmp/skv && /tmp/skv/bin/pip install scikit-learn
    /tmp/skv/bin/python data/digits/make.py
"""

import json

from sklearn.datasets import load_digits

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
digits = load_digits()
VAL = 297
with open("data/digits/digits.jsonl", "w") as f:
    n = len(digits.target)
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        pixels = [float(v) / 16.0 for v in image.reshape(-1)]
        split = "val" if i >= n - VAL else "train"
        row = {"pixels": pixels, "label": int(label), "text": f"a handwritten {WORDS[label]}", "split": split}
        f.write(json.dumps(row, separators=(",", ":")) + "\n")

import struct

with open("data/digits/pixels.bin", "wb") as f:
    for image in digits.images:
        f.write(struct.pack("<H", 17))
        f.write(struct.pack("<64H", *[int(v) for v in image.reshape(-1)]))
