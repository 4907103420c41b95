"""Arrow schemas of every table camlabel writes: one row per image, one row per failed image."""

import pyarrow as pa

ANNOTATION = pa.struct([
    ("category_id", pa.int32()),  # class index + 1, as in the COCO export
    ("class_name", pa.string()),
    ("bbox", pa.list_(pa.float32(), 4)),  # COCO [x, y, w, h] in original-image pixels
    ("score", pa.float32()),
    ("area", pa.int64()),  # mask pixels
    ("rle_counts", pa.string()),  # COCO compressed RLE of the mask, size = (height, width)
    # without labels: the other classes named on this object, best first (a tabby's "tiger cat"); null in older parts
    ("runner_ups", pa.list_(pa.struct([("category_id", pa.int32()), ("class_name", pa.string()),
                                       ("score", pa.float32())]))),
])

HEATMAP = pa.struct([
    ("category_id", pa.int32()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("values", pa.binary()),  # float16, row-major, the refined map over the image (max side 64), in [0,1]
])

IMAGES = pa.schema([
    ("image_id", pa.string()),  # sha256 of the file's bytes: stable across names and runs
    ("path", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("label_source", pa.string()),  # "labels" (image-level labels given) or "predicted"
    ("top_classes", pa.list_(pa.int32())),
    ("top_scores", pa.list_(pa.float32())),
    ("annotations", pa.list_(ANNOTATION)),
    ("heatmaps", pa.list_(HEATMAP)),  # what the masks were cut from; export-masks draws its ignore band here
    ("method", pa.string()),
    ("precision", pa.string()),  # the model's passes as run: "float32" or "bfloat16" ("auto" resolved)
    ("device", pa.string()),  # the actor's device: "cpu", or "cuda:<GPU name> (CUDA <version>)"
])

ERRORS = pa.schema([
    ("path", pa.string()),
    ("stage", pa.string()),  # list | read | decode | annotate | duplicate
    ("reason", pa.string()),
])

# What an annotate actor returns for a batch: an image row, or an error (error_stage set).
RESULTS = pa.schema([*IMAGES, ("error_stage", pa.string()), ("error", pa.string())])
