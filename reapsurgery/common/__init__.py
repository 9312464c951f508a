"""What both stages read and write: checkpoint directories, safetensors headers, per-family
layouts, saliency.json, mask.json and quantization settings. Imports no torch; imports neither stage."""
