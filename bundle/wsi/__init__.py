"""Whole-slide images: pyramid levels at the model's magnification, tissue detection, QuPath-ready outputs.

Modules: ``slide`` (reading a WSI through MONAI's ``WSIReader``, choosing the level), ``tissue`` (tissue mask on a
low-resolution level), ``geojson`` (gland polygons in level-0 coordinates), ``pyramid`` (pyramidal tiled TIFF label
masks with the slide's resolution), ``segment`` (``SlideSegmenter``: the whole pipeline, run by
``configs/inference_wsi.json``).
"""
